"""One watched training run inside a framework's loop: the monitor, the online stop judgement, the recipe."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikedoc.guard.config import GuardConfig
from spikedoc.integrations.healing import StepHealer
from spikedoc.integrations.recipe import ResumeRecipe, resume_recipe
from spikedoc.analysis.recovery import VERDICTS
from spikedoc.integrations.stopping import IncidentWatch, StopConfig, StopDecision

__all__ = ["CallbackRun", "WatchedRun", "base_optimizer", "base_scheduler"]

logger = logging.getLogger("spikedoc.integrations")


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under framework wrappers (accelerate's `AcceleratedOptimizer`, Lightning's)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"spikedoc: expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def base_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler under framework wrappers (accelerate's `AcceleratedScheduler`), or None."""
    lr_scheduler = torch.optim.lr_scheduler.LRScheduler
    seen = 0
    while scheduler is not None and not isinstance(scheduler, lr_scheduler) and hasattr(scheduler, "scheduler") and seen < 8:
        scheduler, seen = scheduler.scheduler, seen + 1
    return scheduler


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
        self.ranks: Any = None
        self._watched: tuple[nn.Module, torch.optim.Optimizer] | None = None

    def start(self, model: nn.Module, optimizer: Any, run_dir: str | Path, *, start_step: int | None, clip: float | None,
              scheduler: Any = None) -> None:  # fmt: skip
        """Attach the monitor (once; a second call is ignored). A failure is logged; training goes on unwatched."""
        if self.monitor is not None:
            return
        import spikedoc
        from spikedoc.monitor.distributed import Ranks

        self.run_dir = Path(self.run_dir or run_dir)
        self.clip = clip
        try:
            self.ranks = Ranks()  # a collective: every rank starts
            self._watched = (model, base_optimizer(optimizer))
            self.monitor = spikedoc.watch(model, self._watched[1], run_dir=self.run_dir, start_step=start_step,
                                          scheduler=scheduler, **self.watch_kwargs)  # fmt: skip
        except Exception:  # noqa: BLE001 - monitoring never stops training
            logger.exception("spikedoc: could not start recording %s; training goes on unwatched", self.run_dir)
            self.monitor = None
            return
        if self.stop_config is not None:
            self.incidents = IncidentWatch(self.stop_config)
            self.monitor.subscribe(self._on_row)

    def reopen(self, start_step: int, *, scheduler: Any = None) -> None:
        """Close the recording and open a new segment that numbers steps from `start_step` (after a
        rollback); the data stream's sample offset goes on, since the framework's loader moves on."""
        if self.monitor is None or self._watched is None:
            return
        import spikedoc

        samples = self.monitor.sample_offset
        self.monitor.close()
        model, optimizer = self._watched
        self.monitor = spikedoc.watch(model, optimizer, run_dir=self.run_dir, start_step=start_step, start_sample=samples,
                                      scheduler=scheduler, **self.watch_kwargs)  # fmt: skip

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
        """True once an incident was judged one to stop on, on this rank or any other; the first call prescribes.

        In a distributed run the ranks agree every step (one tiny collective on the monitor's gloo
        group), so all of them stop at the same step rather than some waiting forever for the others.
        """
        if self.monitor is None or self.stop_config is None:
            return False
        if self.recipe is not None:
            return True
        decision = self._agreed_decision()
        if decision is None:
            return False
        try:
            self._prescribe(decision)
        except Exception:  # noqa: BLE001 - the stop stands without its recipe
            logger.exception("spikedoc: stopping at step %d (%s); the resume recipe failed", decision.step, decision.verdict)
            self.recipe = ResumeRecipe(onset_step=decision.onset_step, verdict=decision.verdict,
                                       rollback_to_step=decision.onset_step, analysis_error="recipe failed")
        return True

    def _agreed_decision(self) -> StopDecision | None:
        """This rank's decision, or in a distributed run the earliest incident any rank decided to stop on."""
        mine = self.decision
        if self.ranks.world == 1:
            return mine
        if not self.ranks.max_int(int(mine is not None)):
            return None
        big = 1 << 62
        onset = -self.ranks.max_int(-mine.onset_step if mine is not None else -big)
        step = self.ranks.max_int(mine.step if mine is not None else -1)
        worst = self.ranks.max_int(VERDICTS.index(mine.verdict) if mine is not None else -1)
        if mine is not None and mine.onset_step == onset:
            return mine
        return StopDecision(onset, step, VERDICTS[worst], math.nan, math.nan, math.nan)

    def _prescribe(self, d: StopDecision) -> None:
        self.monitor.event("stop", onset_step=d.onset_step, verdict=d.verdict, excess_ratio=d.excess_ratio,
                           excess_sigma=d.excess_sigma, own=self.decision is not None)  # fmt: skip
        self.monitor.close()
        if self.ranks.world > 1:
            self.ranks.max_int(0)  # every rank's rows are written before the run is analysed
            if self.ranks.rank != 0:
                self.recipe = ResumeRecipe(onset_step=d.onset_step, verdict=d.verdict, rollback_to_step=d.onset_step,
                                           analysis_error="the recipe is logged by rank 0")  # fmt: skip
                logger.warning("spikedoc: stopping training at step %d: %s (rank 0 logs how to resume)", d.step, d.verdict)
                return
        self.recipe = resume_recipe(self.run_dir, d, checkpoints=self.checkpoints, peak_lr=self.peak_lr, clip=self.clip)
        lines = "\n  ".join(self.recipe.lines() + ([self.how_to_resume(self.recipe)] if self.how_to_resume else []))
        logger.warning("spikedoc: stopping training at step %d: %s\n  %s", d.step, d.verdict, lines)

    def finish(self) -> None:
        """Close the monitor (idempotent)."""
        if self.monitor is not None:
            self.monitor.close()


class CallbackRun:
    """What the framework callbacks share: the options they take and the run they expose.

    `framework_sets` names the framework settings that replace `watch`'s `clip` and `start_step`.
    """

    framework_sets = ""

    def __init__(self, run_dir: str | Path | None = None, *, stop: StopConfig | bool | None = None,
                 heal: GuardConfig | bool = False, how_to_resume: Callable[..., Any], **watch: Any) -> None:  # fmt: skip
        for name in ("clip", "start_step"):
            if name in watch:
                raise ValueError(f"SpikedocCallback: {name}= is set by the {self.framework_sets}")
        config = GuardConfig() if heal is True else (heal or None)
        if config is not None and not isinstance(config, GuardConfig):
            raise TypeError(f"SpikedocCallback: heal must be True, False or a GuardConfig, got {type(heal).__name__}")
        if config is not None and stop:
            raise ValueError("SpikedocCallback: pass heal= or stop=, not both: healing rolls back in process and "
                             "stops the run itself (GuardStopped) once its rollback budget is spent")  # fmt: skip
        self.run = WatchedRun(run_dir=run_dir, stop=config is None if stop is None else stop, watch=watch,
                              how_to_resume=how_to_resume)  # fmt: skip
        self.healer = StepHealer(config) if config is not None else None
        """The in-process guard (`heal=`), else None."""

    @property
    def monitor(self) -> Any:
        """The `spikedoc.Monitor` (None before training starts)."""
        return self.run.monitor

    @property
    def recipe(self) -> ResumeRecipe | None:
        """The resume recipe once training was stopped, else None."""
        return self.run.recipe

