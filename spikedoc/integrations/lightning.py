"""`SpikedocCallback` for Lightning's `Trainer`: records every optimizer step, stops on a persistent incident."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from spikedoc.guard.config import GuardConfig
from spikedoc.integrations._session import CallbackRun, base_optimizer, base_scheduler
from spikedoc.integrations.recipe import ResumeRecipe
from spikedoc.integrations.stopping import StopConfig

try:
    from lightning.pytorch import Callback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("spikedoc.integrations.lightning needs lightning: pip install 'spikedoc[lightning]'") from exc

__all__ = ["SpikedocCallback"]


class SpikedocCallback(CallbackRun, Callback):
    """Records a Lightning run as `spikedoc.watch` does and stops it on a persistent incident.

    Per optimizer step: the loss `training_step` returned (the mean over accumulated batches, not
    Lightning's divided one), the learning rates, the gradient norm before `gradient_clip_val`
    clipping (norm clipping goes through torch's `clip_grad_norm_`, which the monitor observes),
    the clip coefficient and max norm, per-tensor statistics and the batch fingerprint. Lightning
    computes gradients inside `optimizer.step(closure)`, so the gradient statistics are taken in
    `on_before_optimizer_step`. Checkpoints saved by `ModelCheckpoint` are recorded. The run goes to
    `<default_root_dir>/spikedoc` unless `run_dir` is given; each rank writes its own partition.

    With `stop` on (default) a `persistent` or `divergence` verdict (the judgement `spikedoc
    analyze` uses, computed online) sets `trainer.should_stop`, and the diagnosis and resume
    recipe are logged (logger `spikedoc.integrations`) and kept in `callback.recipe`.

    With `heal` (True or a `GuardConfig`) it guards the run instead: the step is judged in
    `on_before_optimizer_step` (before Lightning's clip and the update), a bad step is vetoed (its
    gradients dropped) and damage is rolled back in process, with the LR factor applied to the
    module's scheduler, the tightened clip written to `trainer.gradient_clip_val` and
    `trainer.global_step` set back; `spikedoc.GuardStopped` once the rollback budget is spent.

    Args:
        run_dir: Run directory; default `<default_root_dir>/spikedoc`.
        stop: True (default without `heal`), a `StopConfig`, or False to only record.
        heal: False (default), True for the default `GuardConfig`, or a `GuardConfig`: heal in process.
        **watch: Further `spikedoc.watch` options (`every`, `layer_every`, `flush_every`, ...).

    Example:
        >>> from spikedoc.integrations.lightning import SpikedocCallback
        >>> trainer = lightning.Trainer(max_steps=1000, callbacks=[SpikedocCallback()])  # doctest: +SKIP
    """

    framework_sets = "Trainer (gradient_clip_val, global_step)"

    def __init__(self, run_dir: str | Path | None = None, *, stop: StopConfig | bool | None = None,
                 heal: GuardConfig | bool = False, **watch: Any) -> None:  # fmt: skip
        CallbackRun.__init__(self, run_dir, stop=stop, heal=heal, how_to_resume=_how_to_resume, **watch)
        self._saved = ""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        norm = trainer.gradient_clip_algorithm in (None, "norm")
        clip = float(trainer.gradient_clip_val) if norm and trainer.gradient_clip_val else None
        configs = trainer.lr_scheduler_configs
        scheduler = base_scheduler(configs[0].scheduler) if configs else None
        self.run.start(pl_module, trainer.optimizers[0], Path(trainer.default_root_dir) / "spikedoc",
                       start_step=trainer.global_step, clip=clip, scheduler=scheduler)  # fmt: skip
        if self.healer is not None and self.monitor is not None:
            if not norm:
                raise ValueError("SpikedocCallback(heal=...): the guard tightens norm clipping; "
                                 "Trainer(gradient_clip_algorithm='value') is not supported with heal")  # fmt: skip
            self.healer.start(self.run, pl_module, base_optimizer(trainer.optimizers[0]), scheduler=scheduler,
                              scaler=getattr(trainer.precision_plugin, "scaler", None), clip=clip,
                              step=trainer.global_step)  # fmt: skip

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._note_checkpoint(trainer)
        if self.monitor is not None:
            self.monitor.begin_micro_batch(batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self.healer is not None and self.healer.run is not None:
            # Lightning hands the backward the loss divided by accumulate_grad_batches: undo it.
            self.healer.add_loss(loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor is not None:
            self.monitor.gradients_ready()
        if self.healer is not None and self.healer.run is not None:
            # Inside optimizer.step(closure), after the backward, before the clip and the update
            # (the step's pre-hooks ran before the closure): a veto drops the gradients here.
            self.healer.before_update(trainer.global_step)
            self.healer.drop_now()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.monitor is not None and isinstance(loss, Tensor):
            # Lightning hands back the loss divided by accumulate_grad_batches: undo it.
            self.monitor.record(loss=loss.detach() * trainer.accumulate_grad_batches)
        if self.healer is not None and self.healer.run is not None:
            restored = self.healer.end_step(trainer.global_step)  # None between accumulated batches
            if restored is not None:
                _set_global_step(trainer, restored.step)
            if self.healer.clip != trainer.gradient_clip_val:
                trainer.gradient_clip_val = self.healer.clip  # Lightning reads it at every step
        if self.run.should_stop():
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._note_checkpoint(trainer)
        if self.healer is not None:
            self.healer.close()
        self.run.finish()

    def _note_checkpoint(self, trainer: Any) -> None:
        # ModelCheckpoint runs after user callbacks in on_train_batch_end, so a save shows at the next batch.
        for cb in getattr(trainer, "checkpoint_callbacks", []):
            path = getattr(cb, "_last_checkpoint_saved", "") or getattr(cb, "last_model_path", "")
            if path and path != self._saved:
                self._saved = path
                self.run.checkpoint(path)


def _set_global_step(trainer: Any, step: int) -> None:
    """Lightning's optimizer-step counter (its `global_step`, which max_steps and the step-interval
    schedulers count) set back to `step` after a rollback."""
    loop = trainer.fit_loop.epoch_loop
    progress = loop.automatic_optimization.optim_progress.optimizer.step.total
    progress.ready = progress.completed = step
    loop._batches_that_stepped = step


def _how_to_resume(recipe: ResumeRecipe) -> str:
    """The recipe in Lightning terms."""
    parts = []
    if recipe.peak_lr is not None:
        parts.append(f"peak LR {recipe.peak_lr:.3g} in configure_optimizers")
    if recipe.clip_max_norm is not None:
        parts.append(f"Trainer(gradient_clip_val={recipe.clip_max_norm:g})")
    start = f'trainer.fit(model, ckpt_path="{recipe.checkpoint}")' if recipe.checkpoint else "train from the start"
    return f"resume: {', '.join(parts)}, {start}"
