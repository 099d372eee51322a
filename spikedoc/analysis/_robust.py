"""Numeric helpers the analysis shares: robust location and scale (median, MAD), floors, number formatting."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "times",
    "MAD_TO_SIGMA", "LOG10_SIGMA_FLOOR", "CLIPPED_BELOW", "robust_center_scale", "robust_z", "finite", "as_float",
    "was_clipped", "fmt", "fmt_steps", "fmt_span", "steps_text", "count",
]  # fmt: skip

#: Factor that turns a median absolute deviation into a standard deviation for normal data.
MAD_TO_SIGMA = 1.4826
#: Smallest sigma believed for a series of log10 values: 0.02 is ~5% relative (10**0.02 = 1.047),
#: so a series that is unusually steady does not call a 10% wobble a departure.
LOG10_SIGMA_FLOOR = 0.02
#: A step was clipped when its `clip_coef` is below this. The coefficient is 1.0 when clipping did
#: not act; a cut of less than 0.1% (a norm a hair above the max norm) changes nothing worth counting.
CLIPPED_BELOW = 0.999


def finite(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """The finite entries of `values` as a float64 array."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def as_float(value: Any) -> float:
    """`value` as a float; NaN when it is not a number (None, a string, a list), as in meta.json."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def was_clipped(coef: Iterable[float] | np.ndarray) -> np.ndarray:
    """Per step, whether clipping cut the gradient, from the `clip_coef` values (NaN: False)."""
    return np.asarray(coef, dtype=np.float64) < CLIPPED_BELOW


def robust_center_scale(values: Iterable[float] | np.ndarray, *, rel_floor: float = 0.0) -> tuple[float, float]:
    """Median and MAD-based sigma of the finite values, with sigma floored at `rel_floor * |median|`.

    The floor keeps a constant series (packed sequences of one length, a fixed LR) from turning
    every tiny difference into an infinite z-score. Returns (nan, nan) when nothing is finite.
    """
    arr = finite(values)
    if arr.size == 0:
        return math.nan, math.nan
    center = float(np.median(arr))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(arr - center)))
    return center, max(sigma, rel_floor * abs(center))


def robust_z(value: float, center: float, sigma: float) -> float:
    """(value - center) / sigma; inf when sigma is 0 and value differs, 0 when equal, nan if unknown."""
    if not (math.isfinite(value) and math.isfinite(center)) or not math.isfinite(sigma):
        return math.nan
    diff = value - center
    if sigma <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / sigma


def times(value: float | None, digits: int = 2) -> str:
    """A ratio as "2.5x"; a ratio of a non-finite value is said in words, never "nanx".

    Example:
        >>> times(2.5), times(float("nan"))
        ('2.5x', 'non-finite')
    """
    if value is None or not math.isfinite(float(value)):
        return "non-finite"
    return f"{fmt(value, digits)}x"


def fmt(value: float | None, digits: int = 3) -> str:
    """Short human number: 3 significant digits, scientific for very small or large values."""
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def fmt_steps(items: Iterable[object], limit: int = 6) -> str:
    """`12, 13, 14`, or `12, 13, ... (40 in all)` for long lists."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(str(s) for s in items)
    return ", ".join(str(s) for s in items[: limit - 1]) + f", ... ({len(items)} in all)"


def fmt_step_ranges(steps: Iterable[int], limit: int = 6) -> str:
    """Steps with runs of three or more consecutive ones as ranges: `3, 10..39, 52, 53`.

    Example:
        >>> fmt_step_ranges([3, 10, 11, 12, 52, 53])
        '3, 10..12, 52, 53'
    """
    runs: list[list[int]] = []
    for step in sorted(set(int(s) for s in steps)):
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    items: list[str] = []
    for a, b in runs:
        items += [f"{a}..{b}"] if b - a >= 2 else [str(s) for s in range(a, b + 1)]
    return fmt_steps(items, limit)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 step`, `2 steps`: a number with its noun in the right number.

    Example:
        >>> count(1, "step"), count(3, "batch", "batches")
        ('1 step', '3 batches')
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def fmt_span(first: int, last: int) -> str:
    """`step 3`, `steps 3-5`.

    Example:
        >>> fmt_span(3, 3), fmt_span(3, 5)
        ('step 3', 'steps 3-5')
    """
    return f"step {first}" if first == last else f"steps {first}-{last}"


def steps_text(count: int) -> str:
    """`1 step`, `3 steps`.

    Example:
        >>> steps_text(1), steps_text(12)
        ('1 step', '12 steps')
    """
    return f"{count} step" if count == 1 else f"{count} steps"
