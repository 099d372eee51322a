"""RollingBaseline: median and IQR-based sigma of the last N accepted values, kept in a sorted window."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterable

__all__ = ["RollingBaseline", "IQR_TO_SIGMA"]

#: The interquartile range of a normal distribution is 1.349 sigma.
IQR_TO_SIGMA = 1.0 / 1.3489795003921634

# Sheppard: a value rounded to resolution q carries a uniform error of standard deviation q/sqrt(12).
_ROUNDING_SIGMA = 1.0 / math.sqrt(12.0)


class RollingBaseline:
    """Median and IQR-based sigma of the last `window` values added, with no sort per step.

    The window is kept twice: in arrival order (to know which value leaves) and sorted (so the
    median and quartiles are index look-ups instead of a sort per step). Insertion and removal in
    the sorted list are a binary search plus a memmove of at most `window` pointers, which is what
    makes a million steps take seconds rather than minutes.

    Example:
        >>> b = RollingBaseline(window=5)
        >>> for v in [3.0, 3.1, 2.9, 3.0, 3.2, 3.0]:
        ...     b.add(v)
        >>> b.summary()[:2]
        (5, 3.0)
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []
        self._positions: tuple[int, tuple[tuple[int, float], ...]] = (0, ())

    def __len__(self) -> int:
        return len(self._fifo)

    def add(self, value: float) -> None:
        """Add one finite value; the oldest one leaves once the window is full."""
        insort(self._sorted, value)
        self._fifo.append(value)
        if len(self._fifo) > self.window:
            old = self._fifo.popleft()
            del self._sorted[bisect_left(self._sorted, old)]

    def reset(self, values: Iterable[float]) -> None:
        """Replace the window with the last `window` of `values` (in arrival order)."""
        kept = list(values)[-self.window :]
        self._fifo = deque(kept)
        self._sorted = sorted(kept)

    def values(self) -> list[float]:
        """The window in arrival order (oldest first), e.g. to save it."""
        return list(self._fifo)

    def summary(self) -> tuple[int, float, float]:
        """(count, median, sigma) of the window; (0, nan, nan) when it is empty.

        The sigma is IQR / 1.349, the normal-consistent sigma. When the IQR is exactly 0 (more than
        half the window holds one value, as 4-decimal losses or 2-decimal grad norms on a flat
        stretch do) it is instead the gap to the nearest other value divided by sqrt(12): the
        rounding noise of a series logged at that resolution (Sheppard), 0 for a constant window.
        Floors relative to the level are the caller's policy.
        """
        s = self._sorted
        n = len(s)
        if n < 2:
            return (n, s[0], 0.0) if n else (0, math.nan, math.nan)
        if self._positions[0] != n:
            # Quartile positions depend on n only, which is constant once the window is full.
            self._positions = (n, tuple((int(p * (n - 1)), p * (n - 1) - int(p * (n - 1))) for p in (0.25, 0.5, 0.75)))
        (i1, f1), (i2, f2), (i3, f3) = self._positions[1]
        # Linear interpolation between order statistics, as numpy.quantile's default method.
        q1 = s[i1] + (s[i1 + 1] - s[i1]) * f1
        center = s[i2] + (s[i2 + 1] - s[i2]) * f2
        iqr = s[i3] + (s[i3 + 1] - s[i3]) * f3 - q1
        if iqr > 0.0:
            return n, center, iqr * IQR_TO_SIGMA
        return n, center, _resolution(s, center) * _ROUNDING_SIGMA


def _resolution(s: list[float], center: float) -> float:
    # Distance from the median to the nearest different value on either side; 0 if none.
    above = bisect_right(s, center)
    below = bisect_left(s, center)
    gaps = []
    if above < len(s):
        gaps.append(s[above] - center)
    if below > 0:
        gaps.append(center - s[below - 1])
    return min(gaps) if gaps else 0.0
