"""Configuration of `watch`: which steps are recorded, clipping, flushing, step numbering."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WatchConfig"]


@dataclass(kw_only=True)
class WatchConfig:
    """How `watch` records; every field is a keyword argument of `watch`."""

    every: int = 1
    """Write a step row every `every` optimizer steps (steps whose index is a multiple)."""
    layer_every: int = 1
    """Write per-tensor layer rows every `layer_every` optimizer steps."""
    clip: float | None = None
    """Clip gradients to this global L2 norm in the step pre-hook (like `clip_grad_norm_`)."""
    flush_every: int = 100
    """Step rows buffered per Parquet part: the most a `kill -9` loses when steps are fast."""
    flush_seconds: float = 30.0
    """Longest time rows stay buffered: the most a `kill -9` loses when steps are slow."""
    start_step: int | None = None
    """Index of the first recorded step; default: the optimizer's own step count, else 0."""
    start_sample: int = 0
    """Samples the data stream had handed out before the first recorded step (a resume that knows
    its data position): `sample_offset` counts on from here."""
    tensorboard: str | None = None
    """Folder to mirror the run to as TensorBoard scalars while it trains (same tags as
    `spikedoc tensorboard`); None: no mirror."""
    pad_token_id: int | None = None
    """Token id counted as padding in sequence lengths when the model gets no `attention_mask`."""
    budget: float | None = 0.02
    """Largest share of the step time the monitor may take: the full statistics (gradient maxima,
    update norms, optimizer state) come on a cadence that keeps it within, every step again after
    the spike detector flags the loss or gradient norm. None: full statistics every step."""

    def __post_init__(self) -> None:
        for name in ("every", "layer_every", "flush_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"watch: {name} must be a positive integer, got {value!r}")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and self.clip > 0):
            raise ValueError(f"watch: clip must be a positive max norm or None, got {self.clip!r}")
        if not (isinstance(self.flush_seconds, (int, float)) and self.flush_seconds > 0):
            raise ValueError(f"watch: flush_seconds must be > 0, got {self.flush_seconds!r}")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and 0 < self.budget < 1):
            raise ValueError(f"watch: budget must be a share of the step time in (0, 1), e.g. 0.02, or None; got {self.budget!r}")
        if isinstance(self.start_sample, bool) or not isinstance(self.start_sample, int) or self.start_sample < 0:
            raise ValueError(f"watch: start_sample must be a non-negative integer, got {self.start_sample!r}")
        if self.start_step is not None and (not isinstance(self.start_step, int) or self.start_step < 0):
            raise ValueError(f"watch: start_step must be a non-negative integer or None, got {self.start_step!r}")
