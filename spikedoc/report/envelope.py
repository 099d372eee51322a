"""Downsample a long series for plotting to a min/max envelope per bucket, so no spike is smoothed away."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Envelope", "envelope"]


@dataclass(frozen=True)
class Envelope:
    """A series reduced to `len(step)` buckets (or kept whole when it was short enough).

    Attributes:
        step: Middle step of each bucket (each step itself when not reduced).
        low: Smallest finite value in the bucket (NaN when it held none).
        high: Largest finite value in the bucket: a one-step spike survives any reduction.
        nonfinite_steps: Every step whose value is NaN or inf, unreduced (marked on the plot).
        reduced: Whether buckets hold more than one step.
    """

    step: np.ndarray
    low: np.ndarray
    high: np.ndarray
    nonfinite_steps: np.ndarray
    reduced: bool


def envelope(steps: np.ndarray, values: np.ndarray, buckets: int = 1500) -> Envelope:
    """Reduce `values` over `steps` to at most `buckets` (min, max) pairs of consecutive rows.

    Buckets hold equal numbers of rows; a series of at most `2 * buckets` rows is kept as it is
    (`low == high`). Plotting the band between `low` and `high` shows every excursion a line through
    all points would show, at a fixed cost per pixel column.

    Args:
        steps: Step of each value, in plotting order.
        values: The series; NaN and inf are left out of the band and listed in `nonfinite_steps`.
        buckets: Largest number of points kept.

    Returns:
        The `Envelope`.

    Example:
        >>> steps = np.arange(1_000_000)
        >>> values = np.ones(1_000_000); values[654_321] = 50.0
        >>> env = envelope(steps, values, buckets=1000)
        >>> len(env.step), float(env.high.max()), env.reduced
        (1000, 50.0, True)
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    nonfinite = steps[bad]
    clean = np.where(bad, np.nan, values)
    if len(values) <= 2 * buckets:
        return Envelope(steps.astype(np.float64), clean, clean, nonfinite, reduced=False)
    starts = np.linspace(0, len(values), buckets + 1).astype(np.int64)[:-1]
    ends = np.append(starts[1:], len(values))
    # fmin/fmax skip NaN, so a bucket with some finite value keeps it; an all-NaN bucket stays NaN.
    low = np.fmin.reduceat(clean, starts)
    high = np.fmax.reduceat(clean, starts)
    middle = (steps[starts].astype(np.float64) + steps[ends - 1].astype(np.float64)) / 2
    return Envelope(middle, low, high, nonfinite, reduced=True)
