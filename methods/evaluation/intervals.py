"""95% intervals for the figures a trial reports. Presence is a proportion over n generated images, so a
figure of 0.25 over 12 images says little; every presence and resurgence the project reports carries n and
one of these intervals.

- `wilson(p, n)`: the Wilson score interval of a proportion p observed over n trials (Wilson 1927). Unlike
  p +- 1.96 sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1.
- `newcombe(p1, n1, p2, n2)`: the interval of the difference p1 - p2 of two proportions by Newcombe's hybrid
  score method (Newcombe 1998, method 10), built from the two Wilson intervals. Resurgence is such a
  difference (presence now - presence right after erasure). The method assumes independent samples; the
  project draws both on the same seeds (common random numbers), which makes the two positively correlated and
  the true interval narrower, so this one errs wide.

A mean presence over several concepts is treated as one proportion over all their images (the pooled n):
exact when every concept has the same number of images, as the trial gives them.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for proportion p over n observations; (nan, nan) when n < 1
    or p is not a number."""
    if not n >= 1 or not 0 <= p <= 1:
        return math.nan, math.nan
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(p1: float, n1: float, p2: float, n2: float, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the hybrid score interval for p1 - p2 (each a proportion over its own n)."""
    l1, u1 = wilson(p1, n1, z)
    l2, u2 = wilson(p2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
