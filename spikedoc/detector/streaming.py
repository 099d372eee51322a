"""The streaming spike detector: one robust rolling baseline per series, judged one step at a time.

Plain Python (no pandas, no numpy), so the monitor's cost budget and the guard run the very rule
`analyze` runs offline (`spikedoc.analysis.detect.flag_series`) without the analysis stack.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, NamedTuple

from spikedoc.detector.baseline import RollingBaseline

__all__ = ["DetectorConfig", "Flag", "StreamingDetector"]

_STATE_FORMAT = 1

# Last-resort scale so that a constant series at exactly 0 never divides by zero.
_TINY = 1e-12


@dataclass(kw_only=True)
class DetectorConfig:
    """Settings of the spike detector (defaults and their justification: docs/detection.md).

    Example:
        >>> DetectorConfig(threshold=6.0).window
        100
    """

    window: int = 100
    """Past values (finite, not flagged) that form the rolling baseline: its median and IQR. Short
    enough that a still-falling loss does not set the scale (llm-foundry's 100-step window)."""
    threshold: float = 7.0
    """Robust sigmas above the baseline median at which a value is flagged (OLMo 2's 7 sigma)."""
    min_history: int = 50
    """Values in the baseline before it is trusted (`warm`); before that the cold floor applies and
    incidents are marked `low_confidence`. At 50 values the IQR sigma is within about 16%."""
    scale_floor: float = 1e-3
    """Smallest sigma believed once warm, as a fraction of |baseline| (an absolute floor in log units
    for log-scale series, i.e. again a fraction of the value): no departure under
    threshold x 0.1% = 0.7% of the level is ever a spike."""
    cold_scale_floor: float = 0.05
    """Smallest sigma believed while the baseline is cold (fewer than `min_history` values), as a
    fraction of the level: with few points, only a jump of threshold x 5% = 35% is flagged. This is
    the relative-jump rule that lets short, warm-up-less logs be judged at all; `math.inf` turns it off."""
    min_ratio: float = 0.0
    """A flagged value must also exceed the baseline by this fraction (0.0: the sigma rule alone).
    Raise it to ignore statistically clear but small bumps in very smooth large-batch losses."""
    merge_gap: int = 3
    """In-band observations tolerated between flagged ones of the same incident."""
    persist_steps: int = 500
    """Steps out of the band after which a departure is persistent: the incident is a divergence
    (or an unrecovered grad spike) and the baseline re-adapts to the new level."""
    merge_lead: int = 10
    """Steps by which a grad-norm incident may precede a loss incident and still be merged with it."""
    grad_norm_log_scale: bool = True
    """Judge the grad norm on a log scale (its noise is multiplicative and its spikes span decades)."""

    def __post_init__(self) -> None:
        _check_int("window", self.window, 2)
        _check_int("min_history", self.min_history, 1)
        _check_int("merge_gap", self.merge_gap, 0)
        _check_int("persist_steps", self.persist_steps, 1)
        _check_int("merge_lead", self.merge_lead, 0)
        if self.min_history > self.window:
            raise ValueError(
                f"DetectorConfig.min_history ({self.min_history}) must not exceed window ({self.window}): "
                "the baseline could never become warm; lower min_history or raise window"
            )
        _check_float("threshold", self.threshold, lower=0.0, strict=True)
        _check_float("scale_floor", self.scale_floor, lower=0.0)
        _check_float("cold_scale_floor", self.cold_scale_floor, lower=self.scale_floor, allow_inf=True)
        _check_float("min_ratio", self.min_ratio, lower=0.0)
        if not isinstance(self.grad_norm_log_scale, bool):
            raise ValueError(f"DetectorConfig.grad_norm_log_scale must be True or False, got {self.grad_norm_log_scale!r}")


def _check_int(name: str, value: Any, lower: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < lower:
        raise ValueError(f"DetectorConfig.{name} must be an integer >= {lower}, got {value!r}")


def _check_float(name: str, value: Any, *, lower: float, strict: bool = False, allow_inf: bool = False) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (allow_inf or math.isfinite(value)) and (value > lower if strict else value >= lower)
    if not ok:
        bound = f"> {lower}" if strict else f">= {lower}"
        raise ValueError(f"DetectorConfig.{name} must be a finite number {bound}, got {value!r}")


class Flag(NamedTuple):
    """The detector's verdict on one observation (a named tuple: one is built per step of a guarded run)."""

    step: int
    value: float
    baseline: float
    """Baseline median before this step, in the value's units (geometric for log-scale); nan if no history."""
    scale: float
    """Robust sigma of the baseline in the working space (natural-log units for log-scale)."""
    z: float
    """(value - baseline) / scale in the working space; inf when non-finite, nan when not judged."""
    flagged: bool
    """Out of the band above the baseline, or non-finite."""
    nonfinite: bool
    warm: bool
    """The baseline had `min_history` values: a confident judgement."""
    readapted: bool = False
    """This step ended a persistent departure and the baseline was re-seeded at the new level."""


class StreamingDetector:
    """Flags upward departures of one series, one step at a time, in O(window) memory.

    Flagged and non-finite values never enter the baseline, so a spike cannot inflate its own sigma
    and a second spike right after a first is still judged against the healthy level. After
    `persist_steps` out of the band the baseline is re-seeded with the held-out values, so a
    permanent level shift is reported once (as persistent) rather than flagged forever.
    `flag_series` runs exactly this code, so offline analysis and an online guard agree.

    Example:
        >>> det = StreamingDetector()
        >>> flags = [det.update(s, 3.0 + 0.01 * (s % 5)) for s in range(100)]
        >>> det.update(100, 6.0).flagged
        True
        >>> resumed = StreamingDetector()
        >>> resumed.load_state_dict(det.state_dict())
        >>> resumed.update(101, 3.02).flagged
        False
    """

    def __init__(self, config: DetectorConfig | None = None, *, log_scale: bool = False) -> None:
        if config is not None and not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig or None, got {type(config).__name__}")
        self.config = config if config is not None else DetectorConfig()
        self.log_scale = bool(log_scale)
        self._baseline = RollingBaseline(self.config.window)
        self._held: deque[float] = deque(maxlen=self.config.window)
        self._streak_start: int | None = None
        self._gap = 0

    @property
    def streak_start(self) -> int | None:
        """Step at which the current out-of-band streak began, or None when in band."""
        return self._streak_start

    def update(self, step: int, value: float) -> Flag:
        """Judge `value` at `step` against the past, then add it to the baseline if it is in band."""
        value = float(value)
        return Flag(int(step), value, *self._judge(int(step), value))

    def assess(self, step: int, value: float) -> Flag:
        """Judge `value` at `step` exactly as `update` would, leaving the detector unchanged: `learn`
        it afterwards, or never (a guard's vetoed step never enters the baseline)."""
        value = float(value)
        return Flag(int(step), value, *self._assess(value)[:-1])

    def learn(self, flag: Flag) -> bool:
        """Take in an observation `assess` judged, as `update` would have; True when that ended a
        persistent departure (the baseline was re-seeded). Learn each assessment once, in order."""
        x = self._working(flag.value)
        return x is not None and self._learn(flag.step, x, flag.flagged)

    def window(self) -> list[float]:
        """The baseline's values (oldest first), in the series' own units."""
        values = self._baseline.values()
        return [math.exp(v) for v in values] if self.log_scale else values

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this detector is; plain JSON types only."""
        return {
            "format": _STATE_FORMAT,
            "config": asdict(self.config),
            "log_scale": self.log_scale,
            "window": self._baseline.values(),
            "held": list(self._held),
            "streak_start": self._streak_start,
            "gap": self._gap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; raises ValueError if it is malformed or from other settings."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a detector state of format {_STATE_FORMAT}: {str(state)[:80]!r}")
        mine = asdict(self.config)
        theirs = state.get("config", {})
        differ = sorted(k for k in mine if theirs.get(k) != mine[k])
        if differ or state.get("log_scale") != self.log_scale:
            what = ", ".join(f"{k}={theirs.get(k)!r} (here {mine[k]!r})" for k in differ) or "log_scale"
            raise ValueError(f"detector state was saved with other settings: {what}; build the detector with them")
        window, held = state.get("window"), state.get("held")
        numbers = [*window, *held] if isinstance(window, list) and isinstance(held, list) else None
        if numbers is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError("detector state holds a window that is not a list of finite numbers")
        self._baseline.reset(float(v) for v in window)
        self._held = deque((float(v) for v in held), maxlen=self.config.window)
        start = state.get("streak_start")
        self._streak_start = None if start is None else int(start)
        self._gap = int(state.get("gap", 0))

    def _run(self, steps: Sequence[int], values: Sequence[float]) -> list[tuple]:
        # flag_series's loop: `_judge` over a whole series, one row per step.
        judge = self._judge
        return [judge(step, value) for step, value in zip(steps, values)]

    def _judge(self, step: int, value: float) -> tuple[float, float, float, bool, bool, bool, bool]:
        """The rule, one step: judge `value` against the baseline, then learn it.

        Returns (baseline shown, scale, z, flagged, nonfinite, warm, readapted). Runs once per
        step of series a million steps long: one summary of the window, no allocation beyond the result.
        """
        shown, scale, z, flagged, nonfinite, warm, x = self._assess(value)
        readapted = x is not None and self._learn(step, x, flagged)
        return shown, scale, z, flagged, nonfinite, warm, readapted

    def _assess(self, value: float) -> tuple[float, float, float, bool, bool, bool, float | None]:
        """(baseline shown, scale, z, flagged, nonfinite, warm, x): the judgement of `value`, with x its
        working-space value to learn, None when it never enters the baseline. Changes nothing."""
        cfg = self.config
        n, center, sigma = self._baseline.summary()
        log_scale = self.log_scale
        warm = n >= cfg.min_history
        if n:
            # The floor is the smallest noise believed: a fraction of the level (of the value
            # itself on a log scale), larger while the baseline is cold; _TINY guards a zero level.
            floor = cfg.scale_floor if warm else cfg.cold_scale_floor
            scale = max(sigma, floor if log_scale else floor * abs(center), _TINY)
            shown = math.exp(center) if log_scale else center
        else:
            scale = shown = math.nan
        x = self._working(value)
        if x is None:  # never enters the baseline: flagged when non-finite, not judged when it has no log
            nonfinite = not math.isfinite(value)
            return shown, scale, math.inf if nonfinite else math.nan, nonfinite, nonfinite, warm, None
        if not n:
            return shown, scale, math.nan, False, False, warm, x
        dev = x - center
        z = dev / scale
        return shown, scale, z, z > cfg.threshold and dev > self._min_dev(center), False, warm, x

    def _working(self, value: float) -> float | None:
        """`value` in the working space (its log on a log scale); None when it never enters the
        baseline: non-finite, or no logarithm (e.g. a grad norm logged as 0)."""
        if not math.isfinite(value) or (self.log_scale and value <= 0.0):
            return None
        return math.log(value) if self.log_scale else value

    def _learn(self, step: int, x: float, flagged: bool) -> bool:
        """Add a judged value `x` (working space): to the baseline when in band, else to the held-out
        streak. True when the streak became persistent and re-seeded the baseline."""
        if flagged:
            if self._streak_start is None:
                self._streak_start = step
            self._held.append(x)
            self._gap = 0
            if step - self._streak_start >= self.config.persist_steps:
                self._baseline.reset(self._held)
                self._held.clear()
                self._streak_start = None
                return True
            return False
        self._baseline.add(x)
        if self._streak_start is not None:
            self._gap += 1
            if self._gap > self.config.merge_gap:
                self._streak_start, self._gap = None, 0
                self._held.clear()
        return False

    def _min_dev(self, center: float) -> float:
        """Smallest departure flagged besides the sigma rule (`min_ratio` of the level)."""
        ratio = self.config.min_ratio
        return math.log1p(ratio) if self.log_scale else ratio * abs(center)
