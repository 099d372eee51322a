"""GuardConfig: when the guard vetoes a step, checkpoints, rolls back, and what a rollback changes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GuardConfig"]


def _positive_int(name: str, value: Any, *, allow_none: bool = False, lower: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lower:
        none = " or None" if allow_none else ""
        raise ValueError(f"Guard: {name} must be an integer >= {lower}{none}, got {value!r}")


@dataclass(kw_only=True)
class GuardConfig:
    """Settings of `spikedoc.Guard`; every field is a keyword argument of `Guard` (defaults: docs/guard.md).

    Example:
        >>> GuardConfig(checkpoint_every=200).lr_factor
        0.7
    """

    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (the case study's 500)."""
    keep: int = 3
    """Checkpoint files kept on disk; older ones are deleted once a newer one is written and checked."""
    keep_in_memory: bool = True
    """Also keep the newest good checkpoint in host memory, so a rollback does not wait on the disk."""
    write_in_background: bool = True
    """Write checkpoint files on a background thread while training goes on (one write at a time:
    the next checkpoint waits for it). Under torch.distributed files are always written in the
    foreground, so that every rank knows all ranks' files landed before one counts."""
    clip: float | None = 1.0
    """Global gradient-norm clipping (the monitor's `clip=`); a rollback tightens it. None: no clipping."""
    veto: bool = True
    """Veto (do not apply) a step whose loss or gradient norm is non-finite or far out of band."""
    veto_sigma: float = 10.0
    """Robust sigmas above the warm baseline at which a step's loss vetoes it (the detector flags at
    7); the gradient norm too, when the loss is also out of the detector's band."""
    grad_veto_sigma: float = 20.0
    """Robust sigmas at which the gradient norm alone, with an ordinary loss, vetoes a step. Healthy
    steps reach 8-12 sigmas of it with an ordinary loss (clean runs of the test transformer, seeds
    0-8 even; a gradient three times its usual size on one step: 7.2 and 12.0), and clipping
    bounds such a step's update anyway; a gradient ten times its size reached 16.6 and 22.9."""
    max_vetoes_in_row: int = 5
    """Consecutive vetoed steps after which the guard acts: each vetoed for its loss, replay steps
    tell a broken state, a corrupt stretch of data and a transient fault apart (`replay.py`); else
    the damage is in the state: roll back (after replaying the suspect batches on the checkpoint)."""
    max_data_skips: int = 500
    """Batches a corrupt stretch of data may cost before the guard stops. Vetoes for their loss that
    pile up on a state a replay found sound (the last healthy batch in band on it) are the data's
    fault, not the weights', when their own batches reproduce them there (or none is held to
    replay, or the state was found sound for an earlier stretch and no update was applied since):
    they are skipped without rolling back, up to this many (PaLM skipped 200-500 batches around
    its spikes)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in the whole run; one more incident after that stops it (`GuardStopped`)."""
    lr_factor: float = 0.7
    """Each rollback multiplies the whole LR schedule by this (the case study's peak LR x0.7)."""
    skip_window: int = 0
    """Also skip this many batches before and after each attributed batch (PaLM skipped 200-500)."""
    reset_moments: bool = False
    """On rollback, also reset the optimizer state of the tensors whose gradient norm led the incident."""
    lr_jump_factor: float = 2.0
    """An applied LR at least this many times the step before's (some group's, unscheduled, on a
    warm band) opens an incident at that step, as a loss flag does; the recovery judgement decides
    whether it left damage. Smooth schedules change far less per step once the band is warm (a
    linear warmup over W steps: 1 + 1/s at step s >= 50, so at most 1.02; cosine and step decay go
    down), a declared warm restart is recognised by its scheduler, and the guard's own undo of a
    rollback's factor (1 / `lr_factor`) is never counted: the factor used is at least 1.5 / `lr_factor`."""
    lookback: int = 100
    """Steps before an incident's onset searched for its earliest precursor and an LR jump."""
    seed: int = 0
    """Seed of the data order the guard owns (a shuffling DataLoader without its own generator)."""
    accumulate: int = 1
    """Batches per optimizer step (gradient accumulation): each step's batches are handed out with
    the same step index; call `optimizer.step()` after the last of them."""
    max_steps: int | None = None
    """Stop iterating after this many optimizer steps; None: when the data's `epochs` passes end."""
    epochs: int = 1
    """Passes over `data` (ignored when `max_steps` is reached first)."""
    resume: bool | str | Path | None = None
    """True: continue from the newest readable checkpoint in `run_dir` (error if none); a path:
    continue from that checkpoint file; False: start fresh (existing guard checkpoints are left alone
    but never loaded); None: continue only the same job after a crash (the checkpoint's job
    fingerprint equals this run's: model shapes, optimizer and hyperparameters, scheduler), with a
    warning, and refuse another job's checkpoints with an error."""

    def __post_init__(self) -> None:
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("keep", self.keep)
        _positive_int("max_vetoes_in_row", self.max_vetoes_in_row)
        _positive_int("max_data_skips", self.max_data_skips)
        _positive_int("max_rollbacks", self.max_rollbacks, lower=0)
        _positive_int("skip_window", self.skip_window, lower=0)
        _positive_int("lookback", self.lookback)
        _positive_int("accumulate", self.accumulate)
        _positive_int("max_steps", self.max_steps, allow_none=True)
        _positive_int("epochs", self.epochs)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Guard: seed must be an integer, got {self.seed!r}")
        if self.clip is not None and not (_number(self.clip) and self.clip > 0):
            raise ValueError(f"Guard: clip must be a positive max norm or None, got {self.clip!r}")
        if not (_number(self.veto_sigma) and self.veto_sigma > 0):
            raise ValueError(f"Guard: veto_sigma must be a finite number > 0, got {self.veto_sigma!r}")
        if not (_number(self.grad_veto_sigma) and self.grad_veto_sigma > 0):
            raise ValueError(f"Guard: grad_veto_sigma must be a finite number > 0, got {self.grad_veto_sigma!r}")
        if not (_number(self.lr_jump_factor) and self.lr_jump_factor > 1):
            raise ValueError(f"Guard: lr_jump_factor must be a finite number > 1, got {self.lr_jump_factor!r}")
        if not (_number(self.lr_factor) and 0 < self.lr_factor <= 1):
            raise ValueError(f"Guard: lr_factor must be in (0, 1], got {self.lr_factor!r}")
        for name in ("veto", "keep_in_memory", "write_in_background", "reset_moments"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Guard: {name} must be True or False, got {getattr(self, name)!r}")
        if self.resume not in (True, False, None) and not isinstance(self.resume, (str, Path)):
            raise ValueError(f"Guard: resume must be True, False, None (automatic) or a checkpoint's path, got {self.resume!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
