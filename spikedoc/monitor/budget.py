"""Which steps get the full statistics when `watch(budget=...)` caps the monitor's share of the step time.

Every recorded step gets the cheap statistics: the loss, learning rates, the total and per-tensor
gradient norms (the total needs them anyway), non-finite counts, clipping and the batch
fingerprint. The full statistics (parameter norms, gradient maxima, update norms and ratios, the
optimizer state: Adam's moments and eps fraction, momentum norms) cost one or more passes over the
parameters and state each; under a budget they come every `every` steps, with `every` the smallest
that keeps the measured monitor time per step (in its hooks) within `budget` of the step
time. A step's time runs from its first forward to the end of its update: the time between steps
(data loading, evaluation, other work of the process) does not widen the budget. The spike detector `analyze` uses watches the loss and the gradient norm online: a flag
makes every step full again for `dense_steps`, so the steps around an incident have everything.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from spikedoc.detector.streaming import StreamingDetector  # the detector analyze uses

__all__ = ["Cadence"]

#: Weight of the newest step in the running cost estimates.
_EMA = 0.2
#: Recent step times whose median is the step time: an evaluation, a checkpoint or a pause
#: between steps must not widen the budget.
_STEP_WINDOW = 21


class Cadence:
    """The full-statistics plan under a cost budget.

    Example:
        >>> c = Cadence(budget=0.02, max_every=50, dense_steps=20)
        >>> [c.full(i) for i in range(3)]   # dense at the start, until costs are known
        [True, True, True]
    """

    def __init__(self, *, budget: float, max_every: int = 100, dense_steps: int = 50, warm_steps: int = 10) -> None:
        self.budget, self.max_every, self.dense_steps = budget, max_every, dense_steps
        self.every = 1
        """Current spacing of full steps."""
        self._next_full = 0
        self._dense_until = warm_steps
        self._cost_full = self._cost_light = math.nan
        self._step_times: deque[float] = deque(maxlen=_STEP_WINDOW)
        self._loss = StreamingDetector()
        self._grad = StreamingDetector(log_scale=True)
        self.detects_spikes = True
        """Run the detector on each observed row; False when the caller flags spikes itself (`densify`)."""

    def full(self, index: int) -> bool:
        """Whether step `index` gets the full statistics; asked once per step, in order."""
        if index < self._dense_until or index >= self._next_full:
            self._next_full = index + self.every
            return True
        return False

    def peek(self, index: int) -> bool:
        """What `full(index)` will answer, without planning."""
        return index < self._dense_until or index >= self._next_full

    def observe(self, row: dict[str, Any] | None, *, full: bool, cost: float, step_time: float) -> None:
        """One finished step: its monitor cost and own time (seconds) and its row; adapts `every`, watches for spikes."""
        if math.isfinite(cost):
            if full:
                self._cost_full = cost if math.isnan(self._cost_full) else (1 - _EMA) * self._cost_full + _EMA * cost
            else:
                self._cost_light = cost if math.isnan(self._cost_light) else (1 - _EMA) * self._cost_light + _EMA * cost
        if math.isfinite(step_time) and step_time > 0:
            self._step_times.append(step_time)
        self.every = self._spacing()
        if row is not None and self.detects_spikes:
            step = int(row["step"])
            flagged = self._loss.update(step, _number(row.get("loss"))).flagged
            flagged |= self._grad.update(step, _number(row.get("grad_norm"))).flagged
            if flagged:
                self.densify(step + 1)

    def densify(self, index: int) -> None:
        """Full statistics for every step from `index` for `dense_steps` steps."""
        self._dense_until = max(self._dense_until, index + self.dense_steps)

    def _spacing(self) -> int:
        full, light = self._cost_full, self._cost_light
        step = statistics.median(self._step_times) if self._step_times else math.nan
        if math.isnan(full) or math.isnan(step):
            return 1
        light = full if math.isnan(light) else light
        allowed = self.budget * max(step - full, step * 0.5)  # the step time without the monitor
        extra = max(full - light, 0.0)
        if full <= allowed:
            return 1
        if light >= allowed:
            return self.max_every
        return max(1, min(self.max_every, math.ceil(extra / (allowed - light))))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
