"""`SpikedocCallback` for the Hugging Face `transformers.Trainer`: records every step, stops on a persistent incident."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from spikedoc.guard.config import GuardConfig
from spikedoc.integrations._session import CallbackRun, base_optimizer, base_scheduler
from spikedoc.integrations.recipe import ResumeRecipe
from spikedoc.integrations.stopping import StopConfig
from spikedoc.monitor._step import extract_loss

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "spikedoc.integrations.hf needs transformers: pip install 'spikedoc[hf]'"
    ) from exc

__all__ = ["SpikedocCallback"]


class SpikedocCallback(CallbackRun, TrainerCallback):
    """Records a `Trainer` run as `spikedoc.watch` does and stops it on a persistent incident.

    Everything `watch` records, per optimizer step: the loss (the Trainer's own, also with gradient
    accumulation and `num_items_in_batch`), the learning rate the step used, the gradient norm
    before the Trainer's `max_grad_norm` clipping (what the Trainer logs as `grad_norm`), the clip
    coefficient and max norm, and the per-tensor statistics. Each saved checkpoint is recorded, so
    a rollback can name it. The run goes to `<output_dir>/spikedoc` unless `run_dir` is given; each
    process of a distributed run writes its own `rank=N` partition.

    With `stop` on (default), every step's loss goes to the streaming spike detector and each
    incident's aftermath to the recovery judgement `spikedoc analyze` uses; a `persistent` or
    `divergence` verdict sets `control.should_training_stop`, closes the monitor, analyses the run
    and logs (logger `spikedoc.integrations`) the diagnosis and the resume recipe: the checkpoint to
    resume from, the peak LR, `max_grad_norm` and the batches to skip. `callback.recipe` holds it.

    With `heal` (True or a `GuardConfig`) it guards the run instead of stopping it: each step is
    judged after the Trainer's clipping and before its update; a bad step is vetoed (its gradients
    dropped) and damage is rolled back in process (model, optimizer, scheduler, GradScaler), with
    the LR factor applied to the Trainer's scheduler, the tightened clip written to
    `args.max_grad_norm` and `state.global_step` set back; `spikedoc.GuardStopped` is raised once
    the rollback budget is spent (docs/guard.md, "Inside HF Trainer and Lightning").

    Args:
        run_dir: Run directory; default `<output_dir>/spikedoc`.
        stop: True (default without `heal`) for the default `StopConfig`, a `StopConfig`, or False to only record.
        heal: False (default), True for the default `GuardConfig`, or a `GuardConfig`: heal in process.
        **watch: Further `spikedoc.watch` options (`every`, `layer_every`, `flush_every`,
            `flush_seconds`, `pad_token_id`).

    Example:
        >>> from spikedoc.integrations.hf import SpikedocCallback
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[SpikedocCallback()])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    framework_sets = "Trainer (max_grad_norm, global_step)"

    def __init__(self, run_dir: str | Path | None = None, *, stop: StopConfig | bool | None = None,
                 heal: GuardConfig | bool = False, **watch: Any) -> None:  # fmt: skip
        CallbackRun.__init__(self, run_dir, stop=stop, heal=heal, how_to_resume=_how_to_resume, **watch)
        self._loss_hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:  # fmt: skip
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        scheduler = base_scheduler(lr_scheduler)
        self.run.start(model, optimizer, Path(args.output_dir) / "spikedoc", start_step=state.global_step, clip=clip,
                       scheduler=scheduler)  # fmt: skip
        if self.healer is not None and self.monitor is not None:
            # accelerate's AcceleratedOptimizer holds the GradScaler of fp16 training
            self.healer.start(self.run, model, base_optimizer(optimizer), scheduler=scheduler,
                              scaler=getattr(optimizer, "scaler", None), clip=clip, step=state.global_step)  # fmt: skip
            self._loss_hook = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        loss = extract_loss(output)
        if loss is not None and torch.is_grad_enabled() and module.training:  # evaluation is no step's
            # With `num_items_in_batch` the model returns its micro-batch's share of the step's loss.
            self.healer.add_loss(loss, share=kwargs.get("num_items_in_batch") is not None)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.healer is not None and self.healer.run is not None:
            self.healer.before_update(state.global_step)  # after the Trainer's clipping, before its update

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.healer is not None and self.healer.run is not None:
            restored = self.healer.end_step(state.global_step)
            if restored is not None:
                state.global_step = restored.step  # the LR schedule and max_steps count from the checkpoint again
            if (self.healer.clip or 0.0) != (args.max_grad_norm or 0.0):
                args.max_grad_norm = self.healer.clip or 0.0  # the Trainer reads it at every step
        if self.run.should_stop():
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
        if self.healer is not None:
            self.healer.close()
        self.run.finish()


def _how_to_resume(recipe: ResumeRecipe) -> str:
    """The recipe in Trainer terms."""
    settings = []
    if recipe.peak_lr is not None:
        settings.append(f"learning_rate={recipe.peak_lr:.3g}")
    if recipe.clip_max_norm is not None:
        settings.append(f"max_grad_norm={recipe.clip_max_norm:g}")
    start = f'trainer.train(resume_from_checkpoint="{recipe.checkpoint}")' if recipe.checkpoint else "train from the start"
    return f"resume: TrainingArguments({', '.join(settings)}), {start}"
