"""One watched training run inside a framework's loop: the monitor, the online stop judgement, the recipe."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikedoc.integrations.recipe import ResumeRecipe, resume_recipe
from spikedoc.integrations.stopping import IncidentWatch, StopConfig, StopDecision

__all__ = ["WatchedRun", "base_optimizer"]

logger = logging.getLogger("spikedoc.integrations")


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under framework wrappers (accelerate's `AcceleratedOptimizer`, Lightning's)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"spikedoc: expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


class WatchedRun:
    """`spikedoc.watch` plus the online stop judgement, for callbacks of loops that own the step.

    The callback calls `start` when training begins, `checkpoint` after each save, `should_stop`
    after each step and `finish` when training ends. A stop closes the monitor (every row written),
    analyses the run and logs the diagnosis and a `ResumeRecipe` (also `self.recipe`).
    """

    def __init__(self, *, run_dir: str | Path | None, stop: StopConfig | bool, watch: dict[str, Any],
                 how_to_resume: Callable[[ResumeRecipe], str] | None = None) -> None:  # fmt: skip
        self.how_to_resume = how_to_resume
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.stop_config = StopConfig() if stop is True else (stop or None)
        self.watch_kwargs = watch
        self.monitor: Any = None
        self.incidents: IncidentWatch | None = None
        self.checkpoints: list[tuple[int, str]] = []
        self.decision: StopDecision | None = None
        self.recipe: ResumeRecipe | None = None
        self.clip: float | None = None
        self.peak_lr: float | None = None

    def start(self, model: nn.Module, optimizer: Any, run_dir: str | Path, *, start_step: int | None, clip: float | None) -> None:
        """Attach the monitor (once; a second call is ignored)."""
        if self.monitor is not None:
            return
        import spikedoc

        self.run_dir = Path(self.run_dir or run_dir)
        self.clip = clip
        optimizer = base_optimizer(optimizer)
        self.monitor = spikedoc.watch(model, optimizer, run_dir=self.run_dir, start_step=start_step, **self.watch_kwargs)
        if self.stop_config is not None:
            self.incidents = IncidentWatch(self.stop_config)
            self.monitor.subscribe(self._on_row)

    def _on_row(self, row: dict[str, Any]) -> None:
        lr = row.get("lr")
        if lr is not None and math.isfinite(lr):
            self.peak_lr = max(self.peak_lr or 0.0, float(lr))
        if self.decision is None and self.incidents is not None:
            self.decision = self.incidents.update(int(row["step"]), float(row.get("loss", math.nan)))

    def checkpoint(self, path: str | Path) -> None:
        """A checkpoint holding the state before the next step was saved at `path`."""
        if self.monitor is None:
            return
        step = self.monitor.step
        self.checkpoints.append((step, str(path)))
        self.monitor.event("checkpoint", path=str(path))

    def should_stop(self) -> bool:
        """True once an incident was judged one to stop on; the first call also prescribes."""
        if self.decision is None:
            return False
        if self.recipe is None:
            try:
                self._prescribe()
            except Exception:  # noqa: BLE001 - the stop stands without its recipe
                logger.exception("spikedoc: stopping at step %d (%s); the resume recipe failed",
                                 self.decision.step, self.decision.verdict)
                self.recipe = ResumeRecipe(onset_step=self.decision.onset_step, verdict=self.decision.verdict,
                                           rollback_to_step=self.decision.onset_step, analysis_error="recipe failed")
        return True

    def _prescribe(self) -> None:
        d = self.decision
        self.monitor.event("stop", onset_step=d.onset_step, verdict=d.verdict, excess_ratio=d.excess_ratio,
                           excess_sigma=d.excess_sigma)  # fmt: skip
        self.monitor.close()
        self.recipe = resume_recipe(self.run_dir, d, checkpoints=self.checkpoints, peak_lr=self.peak_lr, clip=self.clip)
        lines = "\n  ".join(self.recipe.lines() + ([self.how_to_resume(self.recipe)] if self.how_to_resume else []))
        logger.warning("spikedoc: stopping training at step %d: %s\n  %s", d.step, d.verdict, lines)

    def finish(self) -> None:
        """Close the monitor (idempotent)."""
        if self.monitor is not None:
            self.monitor.close()
