"""Robust location/scale helpers (median and MAD) shared by attribution, context and lints."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["MAD_TO_SIGMA", "robust_center_scale", "robust_z", "finite", "fmt", "fmt_steps"]

#: Factor that turns a median absolute deviation into a standard deviation for normal data.
MAD_TO_SIGMA = 1.4826


def finite(values: Iterable[float] | np.ndarray) -> np.ndarray:
    """The finite entries of `values` as a float64 array."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


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
