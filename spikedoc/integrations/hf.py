"""`SpikedocCallback` for the Hugging Face `transformers.Trainer`: records every step, stops on a persistent incident."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spikedoc.integrations._session import CallbackRun
from spikedoc.integrations.recipe import ResumeRecipe
from spikedoc.integrations.stopping import StopConfig

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

    Args:
        run_dir: Run directory; default `<output_dir>/spikedoc`.
        stop: True (default) for the default `StopConfig`, a `StopConfig`, or False to only record.
        **watch: Further `spikedoc.watch` options (`every`, `layer_every`, `flush_every`,
            `flush_seconds`, `pad_token_id`).

    Example:
        >>> from spikedoc.integrations.hf import SpikedocCallback
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[SpikedocCallback()])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    framework_sets = "Trainer (max_grad_norm, global_step)"

    def __init__(self, run_dir: str | Path | None = None, *, stop: StopConfig | bool = True, **watch: Any) -> None:
        CallbackRun.__init__(self, run_dir, stop=stop, how_to_resume=_how_to_resume, **watch)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.run.start(model, optimizer, Path(args.output_dir) / "spikedoc", start_step=state.global_step, clip=clip)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.run.checkpoint(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run.should_stop():
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
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
