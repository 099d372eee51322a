"""The loggers bench/overhead.py compares: what each one does around `optimizer.step()`."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["BASELINE", "LOGGERS", "Logger"]

BASELINE = "baseline"


class Logger:
    """No monitoring. Subclasses observe the step; none may change training state."""

    records = "nothing"

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self, loss: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class _Repeat(Logger):
    records = "nothing: a second, identical unmonitored run, whose overhead is the measurement's noise floor"


class _Spikedoc(Logger):
    records = (
        "`watch()` at its defaults: step table (loss, lr, grad/param norm, batch fingerprint) + per-tensor "
        "layer table (grad/param norm) every step, and the full statistics (update norms and ratios, "
        "gradient maxima, Adam moments, eps fraction) on the cadence the default 2% budget allows, to Parquet"
    )

    def open(self, model, optimizer, run_dir):
        import spikedoc

        self._monitor = spikedoc.watch(model, optimizer, run_dir=run_dir)

    def close(self):
        self._monitor.close()


class _SpikedocFull(_Spikedoc):
    records = (
        "as `spikedoc`, with `watch(budget=None)`: every statistic (update norms and ratios, gradient maxima, "
        "Adam moments, eps fraction) on every step, whatever it costs"
    )

    def open(self, model, optimizer, run_dir):
        import spikedoc

        self._monitor = spikedoc.watch(model, optimizer, run_dir=run_dir, budget=None)


class _HandLogger(Logger):
    records = "loss + per-parameter grad norm, param norm, update norm via `.item()`, to CSV at close"

    def open(self, model, optimizer, run_dir):
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._rows: list[tuple] = []
        self._path, self._step = run_dir / "log.csv", 0

    def before_step(self):
        # The update norm needs the old weights: a full copy, as people write it by hand.
        self._before = [p.detach().clone() for _, p in self._params]

    def after_step(self, loss):
        self._rows.append((self._step, "loss", loss.item(), math.nan, math.nan))
        for (name, p), old in zip(self._params, self._before):
            grad_norm = p.grad.norm().item() if p.grad is not None else math.nan
            self._rows.append(
                (
                    self._step,
                    name,
                    grad_norm,
                    p.detach().norm().item(),
                    (p.detach() - old).norm().item(),
                )
            )
        self._step += 1

    def close(self):
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("w", newline="") as f:
            csv.writer(f).writerows(
                [
                    ("step", "name", "grad_norm", "param_norm", "update_norm"),
                    *self._rows,
                ]
            )


class _TensorBoard(Logger):
    records = "loss + per-parameter grad norm and param norm scalars (`SummaryWriter.add_scalar`)"

    def open(self, model, optimizer, run_dir):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir))
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._step = 0

    def after_step(self, loss):
        self._writer.add_scalar("loss", loss.item(), self._step)
        for name, p in self._params:
            if p.grad is not None:
                self._writer.add_scalar(f"grad_norm/{name}", p.grad.norm().item(), self._step)
            self._writer.add_scalar(f"param_norm/{name}", p.detach().norm().item(), self._step)
        self._step += 1

    def close(self):
        self._writer.close()


class _Wandb(Logger):
    records = 'loss + histograms of every parameter and gradient (`wandb.watch(log="all", log_freq=1)`), offline'

    def open(self, model, optimizer, run_dir):
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        self._wandb, self._model = wandb, model
        self._run = wandb.init(mode="offline", dir=str(run_dir), project="spikedoc-overhead")
        wandb.watch(model, log="all", log_freq=1)

    def after_step(self, loss):
        self._run.log({"loss": loss.item()})

    def close(self):
        self._wandb.unwatch(self._model)
        self._run.finish()
        # Stop wandb's service process too, so it cannot steal CPU from the next variant's run.
        self._wandb.teardown()


LOGGERS: dict[str, type[Logger]] = {
    BASELINE: Logger,
    "baseline_repeat": _Repeat,
    "spikedoc": _Spikedoc,
    "spikedoc_full": _SpikedocFull,
    "hand_item_logger": _HandLogger,
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
}
