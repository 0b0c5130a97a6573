"""Small helpers for numbers and messages that the command, tracking and the report share (no heavy imports)."""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any


def finite(v: Any) -> bool:
    """A real number, not nan or inf (metrics MLflow accepts; values a ranking can compare)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt(x: Any, missing: str = "nan") -> str:
    """A value for a table: floats to 4 significant digits, nan and None as `missing`."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def grid_label(value: Any, grid: list[Any]) -> str:
    """A grid value for a one-line table: a scalar as itself; a whole section (an erase section, a model) by
    its place in the grid, `#i`, with its method or name and its preset or the last part of its path when it
    has them (`#1 uce/uce-object`, `#0 pretrained/stable-diffusion-v1-4`); the table's legend gives each
    section in full."""
    if not isinstance(value, dict | list) or value not in grid:
        return fmt(value)
    label = f"#{grid.index(value)}"
    if isinstance(value, dict):
        config = value.get("config") if isinstance(value.get("config"), dict) else {}
        path = config.get("path")
        detail = config.get("preset") or (PurePosixPath(path).name if isinstance(path, str) else None)
        hints = [h for h in (value.get("method") or value.get("name"), detail) if isinstance(h, str)]
        if hints:
            label += " " + "/".join(hints)
    return label


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error's message cut to its first line (for one-line errors and log lines)."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def with_interval(value: Any, low: Any, high: Any, n: Any = None, digits: int = 2, signed: bool | None = None) -> str:
    """'0.25 [0.09, 0.53] n=12': a figure with its 95% interval (n left out when not given); the bare value
    when the interval is missing, '-' when the value is. `signed`: always a sign (a difference, as resurgence);
    None: a sign when the interval reaches below 0."""
    if not finite(value):
        return "-"
    if signed is None:
        signed = finite(low) and low < 0
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if finite(low) and finite(high):
        text += f" [{low:+.{digits}f}, {high:+.{digits}f}]" if signed else f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" n={int(n)}" if finite(n) and n else "")
