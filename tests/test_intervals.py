"""The 95% intervals every presence and resurgence figure carries, against the published worked examples:
Newcombe (1998a), "Two-sided confidence intervals for the single proportion", Table I (score method), and
Newcombe (1998b), "Interval estimation for the difference between independent proportions", Table II
(method 10, the hybrid score interval)."""

import math

import pytest

from methods.evaluation.intervals import newcombe, wilson
from orchestrator.formatting import with_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_the_published_score_intervals(k, n, low, high):
    lo, hi = wilson(k / n, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(
    ("a", "m", "b", "n", "low", "high"),
    [(56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090), (5, 56, 0, 29, -0.0381, 0.1926)],
)
def test_newcombe_matches_the_published_hybrid_score_intervals(a, m, b, n, low, high):
    lo, hi = newcombe(a / m, m, b / n, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_intervals_at_the_edges_and_without_images():
    assert wilson(1.0, 12)[1] == 1.0 and wilson(1.0, 12)[0] < 1.0  # not empty at p = 1, inside [0, 1]
    assert all(math.isnan(v) for v in wilson(0.5, 0))  # no images: no interval
    lo, hi = newcombe(0.25, 12, 0.25, 12)  # no change still has width: 12 images say little
    assert lo < 0 < hi and hi - lo > 0.5


def test_intervals_shrink_with_more_images():
    widths = [wilson(0.5, n)[1] - wilson(0.5, n)[0] for n in (12, 48, 192)]
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.15)  # ~1/sqrt(n)


def test_a_figure_is_written_with_its_interval_and_n():
    assert with_interval(0.25, *wilson(0.25, 12), 12) == "0.25 [0.09, 0.53] n=12"
    assert with_interval(0.1, -0.2, 0.4) == "+0.10 [-0.20, +0.40]"
    assert with_interval(0.1, math.nan, math.nan) == "0.10"
    assert with_interval(None, 0, 1) == "-"
