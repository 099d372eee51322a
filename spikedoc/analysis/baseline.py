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

# Last-resort floor so that a constant series at exactly 0 never divides by zero.
_TINY = 1e-12


class RollingBaseline:
    """Robust centre and scale of the last `window` values added, updated in O(log window) per value.

    The window is kept twice: in arrival order (to know which value leaves) and sorted (so the
    median and quartiles are two index look-ups instead of a sort per step). Insertion and removal
    in the sorted list are a binary search plus a memmove of at most `window` pointers, which is
    what makes a million steps take seconds rather than minutes.

    The centre is the median. The scale is the interquartile range converted to a normal-consistent
    sigma (IQR / 1.349), floored three ways (see `center_scale`).

    Example:
        >>> b = RollingBaseline(window=5)
        >>> for v in [3.0, 3.1, 2.9, 3.0, 3.2, 3.0]:
        ...     b.add(v)
        >>> len(b), b.center_scale(rel_floor=0.0)[0]
        (5, 3.0)
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._fifo: deque[float] = deque()
        self._sorted: list[float] = []

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

    def center_scale(self, rel_floor: float, relative: bool = True) -> tuple[float, float]:
        """Median and robust sigma of the window, or (nan, nan) when it is empty.

        The sigma is the largest of:

        - IQR / 1.349, the normal-consistent sigma of the window;
        - `rel_floor` times |median| (or `rel_floor` itself when `relative` is False, i.e. when
          the values are logarithms and an absolute floor is already a relative one): the noise
          level below which a departure is not believed, whatever the window says;
        - when the IQR is exactly 0 (more than half the window holds one value, as with 4-decimal
          losses or 2-decimal grad norms on a flat stretch), the gap to the nearest other value
          divided by sqrt(12): the rounding noise of a series logged at that resolution.
        """
        s = self._sorted
        n = len(s)
        if n == 0:
            return math.nan, math.nan
        last = n - 1
        center = _quantile(s, last, 0.5)
        iqr = _quantile(s, last, 0.75) - _quantile(s, last, 0.25)
        sigma = iqr * IQR_TO_SIGMA
        if iqr == 0.0:
            sigma = _resolution(s, center) * _ROUNDING_SIGMA
        floor = rel_floor * abs(center) if relative else rel_floor
        return center, max(sigma, floor, _TINY)


def _quantile(s: list[float], last: int, p: float) -> float:
    # Linear interpolation between order statistics, as numpy.quantile's default method.
    pos = p * last
    i = int(pos)
    if i >= last:
        return s[last]
    lo = s[i]
    return lo + (s[i + 1] - lo) * (pos - i)


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
