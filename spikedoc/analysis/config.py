"""AnalysisConfig: the thresholds and windows diagnosis uses (defaults justified in docs/analysis.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AnalysisConfig"]


@dataclass(kw_only=True)
class AnalysisConfig:
    """Settings of `spikedoc.analyze` beyond detection.

    Example:
        >>> from spikedoc.analysis.config import AnalysisConfig
        >>> AnalysisConfig(lookback=200).lr_factor
        0.7
    """

    detector: Any = None
    """`DetectorConfig` passed to detection; None uses the detector's defaults."""
    recovery: Any = None
    """`RecoveryConfig` of the recovery and damage judgement; None uses its defaults."""
    minor_ratio: float = 0.5
    """A recovered incident whose loss peaked less than this fraction above its baseline (or whose
    loss never left its band) is `minor`: on the public modded-nanogpt logs the healthy one-step
    data spikes have a median peak of 1.34x (docs/analysis.md, "Severity")."""
    minor_steps: int = 5
    """A minor incident's loss is out of its band for fewer steps than this: a blip, not an episode
    (893 of the 905 incidents on the public modded-nanogpt logs last one step)."""
    sudden_steps: int = 5
    """Logged steps within which an optimizer-state change must happen to be a precursor: a collapse
    is sudden, while the slow drift healthy runs also show is spread over many more."""
    build_up_steps: int = 2
    """Steps by which a departure (the gradient norm, a tensor) must lead the first non-finite value
    or the loss flag to count as a build-up: the loss of step t shows the update of step t-1, so a
    one-step lead is the order of measurement, not growth."""
    build_up_window: int = 5
    """Steps before the first non-finite value or the loss flag within which a tensor's departure
    from its own history counts as a build-up: an explosion grows into the incident, while one of
    dozens of tensors drifting off its history tens of steps earlier is what healthy runs show too
    (set on the exam's calibration half, `bench/exam.py`)."""
    lookback: int = 100
    """Steps before onset searched for precursors (grad-norm and per-tensor departures, LR jumps,
    clipping saturation, loss-scale drops). PaLM restarted about 100 steps before a spike."""
    layer_history: int = 300
    """Steps of per-tensor history, before the lookback window, that form each tensor's baseline."""
    z_threshold: float = 6.0
    """Robust z-score (MAD-based sigmas) above which a batch statistic or a tensor counts as off."""
    distinct_z: float = 4.5
    """Robust z-score above which a batch's distinct-token ratio counts as off (with `batch_ratio`):
    the ratio is bounded by 1, so a batch of random bytes sits at 1.5-1.6x the median and 4.9-14 sigmas;
    on the exam's 60 clean calibration runs no batch reached 1.5x and the largest upward z was 3.5
    (`bench/exam.py`). Lengths and token counts keep `z_threshold`: their tiny MADs put clean batches
    past z = 8 at 1.5x."""
    stretch_batch_z: float = 2.5
    """Stouffer's z (`sum(z) / sqrt(n)`) of the distinct-token ratios of a stretch of consecutive batches
    at or above which they confirm a stretch of bad data whose loss sat the detector's threshold above
    the steps around it (`stretches.bad_data_stretches`). Set on the exam's calibration half
    (`bench/exam.py`): no stretch of its 119 clean runs passes at 2.0, 2.5, 3.0 or 3.5, while 9, 9, 8
    and 6 of its 9 noisy-label runs with a visible effect do: 2.5 is the highest of these bars that finds
    all 9 (a one-sided p of 0.006 for a stretch of healthy batches)."""
    batch_ratio: float = 1.5
    """A batch statistic must also differ from the run's median by this factor (either way)."""
    near_constant_ratio: float = 0.1
    """Distinct-token ratio at or below which a batch is called near-constant input."""
    clip_saturation: float = 0.5
    """Share of lookback steps with clip_coef < 1 that counts as clipping saturation."""
    lr_jump: float = 10.0
    """An LR change counts as a discontinuity when it is this many times both neighbouring changes
    (so a warmup ramp or a smooth decay never does) and at least 20% of the LR; an LR raised for one
    step and put back is judged against the changes beyond its own return (`context.lr_discontinuities`)."""
    lr_response_steps: int = 20
    """After an upward LR jump, the window whose mean loss (and grad-norm) z-score is tested for a
    rise: Adam's step scales with the LR at once and its momentum (beta1 = 0.9) averages ~10 steps."""
    lr_response_sigma: float = 5.0
    """Robust sigmas, against the run's own earlier windows, above which that mean counts as a
    rise: one test per jump, not a scan of every step, so below the detector's 7 (docs/analysis.md)."""
    state_reset_fraction: float = 0.5
    """After a resume, a loss back more than this share of the way to its initial level means the
    model state was not restored."""
    early_steps: int = 1000
    """Without a visible warmup, incidents before this step count as early (LR too high / no warmup)."""
    lr_factor: float = 0.7
    """Recommended multiplier of the peak LR after damage (a 30% cut, docs/analysis.md, "Recommendation")."""
    max_layers: int = 10
    """Tensors listed per incident."""

    def __post_init__(self) -> None:
        for name in ("lookback", "layer_history", "lr_response_steps", "early_steps", "max_layers",
                     "sudden_steps", "minor_steps", "build_up_steps", "build_up_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"AnalysisConfig.{name} must be a positive integer, got {value!r}")
        if not 0 < self.minor_ratio:
            raise ValueError(f"AnalysisConfig.minor_ratio must be > 0, got {self.minor_ratio!r}")
        for name in ("z_threshold", "distinct_z", "stretch_batch_z", "lr_jump", "lr_response_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AnalysisConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.batch_ratio > 1:
            raise ValueError(f"AnalysisConfig.batch_ratio must be > 1, got {self.batch_ratio!r}")
        for name in ("near_constant_ratio", "clip_saturation", "state_reset_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"AnalysisConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"AnalysisConfig.lr_factor must be in (0, 1], got {self.lr_factor!r}")
