"""Online stop judgement: the streaming spike detector and the recovery judgement `analyze` uses, step by step."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from spikedoc.detector.streaming import DetectorConfig, StreamingDetector
from spikedoc.analysis.recovery import VERDICTS, RecoveryConfig, RecoveryState, RecoveryTracker

__all__ = ["StopConfig", "StopDecision", "IncidentWatch"]


@dataclass(kw_only=True)
class StopConfig:
    """When an integration stops training on an incident.

    Example:
        >>> StopConfig().stop_on
        ('persistent', 'divergence')
    """

    stop_on: tuple[str, ...] = ("persistent", "divergence")
    """Verdicts that stop training. `recovered_with_damage` is left out by default: the run goes on
    and `spikedoc analyze` reports the damage; add it to stop on any lasting damage."""
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    """The spike detector's settings (the same defaults as `analyze`)."""
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    """The recovery judgement's settings (the same defaults as `analyze`)."""

    def __post_init__(self) -> None:
        self.stop_on = tuple(self.stop_on)
        unknown = [v for v in self.stop_on if v not in VERDICTS or v == "recovered"]
        if unknown:
            allowed = ", ".join(v for v in VERDICTS if v != "recovered")
            raise ValueError(f"StopConfig.stop_on: unknown or harmless verdicts {unknown}; choose from {allowed}")
        if not isinstance(self.detector, DetectorConfig):
            raise TypeError(f"StopConfig.detector must be a DetectorConfig, got {type(self.detector).__name__}")
        if not isinstance(self.recovery, RecoveryConfig):
            raise TypeError(f"StopConfig.recovery must be a RecoveryConfig, got {type(self.recovery).__name__}")


@dataclass(frozen=True)
class StopDecision:
    """An incident judged online whose verdict is one to stop on."""

    onset_step: int
    """First flagged step of the incident."""
    step: int
    """Step at which the verdict was reached."""
    verdict: str
    """`persistent`, `divergence` or `recovered_with_damage`."""
    excess_ratio: float
    """Median loss over the last `hold_steps` relative to the pre-incident trajectory, minus 1."""
    excess_sigma: float
    """The same excess in the trajectory's robust sigma (inf when the loss is non-finite)."""
    expected_loss: float
    """Where the healthy run was heading at `step` (nan without a trajectory)."""


class IncidentWatch:
    """Feeds each step's loss to the streaming detector and judges each incident's aftermath online.

    Healthy (unflagged) steps fit the pre-incident trajectory; a flagged step opens a
    `RecoveryTracker`, updated every step until it decides, exactly as `analyze` judges an incident
    offline. `update` returns a `StopDecision` when the verdict is one of `StopConfig.stop_on`.

    Example:
        >>> watch = IncidentWatch()
        >>> decisions = [watch.update(s, 3.0 + 0.01 * (s % 3) + (1.0 if s >= 120 else 0.0)) for s in range(200)]
        >>> d = next(d for d in decisions if d is not None)
        >>> d.onset_step, d.verdict
        (120, 'persistent')
    """

    def __init__(self, config: StopConfig | None = None) -> None:
        self.config = config or StopConfig()
        self._detector = StreamingDetector(self.config.detector)
        self._healthy: deque[tuple[int, float]] = deque(maxlen=self.config.recovery.fit_steps)
        self._tracker: RecoveryTracker | None = None
        self.decided: list[tuple[int, RecoveryState]] = []
        """(onset step, final state) of every incident decided so far, stopping or not."""

    @property
    def open_onset(self) -> int | None:
        """Onset step of the incident being followed, or None."""
        return None if self._tracker is None else self._tracker.onset_step

    def update(self, step: int, loss: float) -> StopDecision | None:
        """Judge one more step; a `StopDecision` when an incident's verdict is one to stop on."""
        flag = self._detector.update(step, loss)
        if self._tracker is None:
            if not flag.flagged:
                self._healthy.append((int(step), float(loss)))
                return None
            steps = [s for s, _ in self._healthy]
            losses = [v for _, v in self._healthy]
            self._tracker = RecoveryTracker(step, steps, losses, config=self.config.recovery)
        state = self._tracker.update(step, loss)
        if not state.decided:
            return None
        tracker, self._tracker = self._tracker, None
        self.decided.append((tracker.onset_step, state))
        if state.verdict not in self.config.stop_on:
            return None
        expected = tracker.trajectory.at(step) if tracker.usable else math.nan
        return StopDecision(tracker.onset_step, int(step), state.verdict, state.excess_ratio, state.excess_sigma, expected)
