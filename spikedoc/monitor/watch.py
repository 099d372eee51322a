"""`spikedoc.watch`: the one call that records a training loop."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.monitor import Monitor

__all__ = ["watch"]


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    run_dir: str | Path | None = None,
    *,
    every: int = 1,
    layer_every: int = 1,
    clip: float | None = None,
    scaler: Any = None,
    flush_every: int = 100,
    flush_seconds: float = 30.0,
    start_step: int | None = None,
    start_sample: int = 0,
    pad_token_id: int | None = None,
    scheduler: Any = None,
    tensorboard: str | Path | None = None,
    budget: float | None = 0.02,
) -> Monitor:
    """Record `model`'s training with `optimizer`, one row per optimizer step, to `run_dir`.

    Attaches forward hooks (loss, micro-batch count, batch fingerprint) and optimizer step hooks
    (gradient, parameter, update and optimizer-state statistics), and observes the loop's own
    `clip_grad_norm_` (gradient statistics before it, its coefficient and max norm). The training
    loop stays as it is; a step that ends with no loss captured or recorded warns once.
    Monitoring failures never stop training: they warn once and count in `Monitor.dropped_rows`.

    Args:
        model: The module whose forward is called in training (compiled, DDP-wrapped or plain).
        optimizer: The optimizer whose `step()` ends each training step, or a list of optimizers
            that step one model together (Muon for the matrices, AdamW for the rest): a training
            step is then every one's `step()`, in any order; each tensor's statistics come from
            the optimizer that owns it, and `meta.json` records which one that is.
        run_dir: Run directory; None picks `runs/<YYYYmmdd-HHMMSS>`. An existing run gets a new
            segment appended.
        every: Write a step row every `every` steps.
        layer_every: Write per-tensor layer rows every `layer_every` steps.
        clip: Clip gradients to this global L2 norm (instead of a `clip_grad_norm_` in the loop,
            which is observed and recorded when there is one).
        scaler: The `torch.amp.GradScaler` in use, to record the loss scale and skipped steps.
        flush_every: Step rows per Parquet part (the most a crash loses when steps are fast).
        flush_seconds: Longest time rows wait in memory (the most a crash loses when slow).
        start_step: Index of the first step; default: the optimizer's step count, else 0.
        start_sample: Samples the data stream handed out before the first step, when a resumed run
            knows its data position: `sample_offset` (the stream positions analyze names) counts on from it.
        pad_token_id: Padding token id for sequence lengths when there is no `attention_mask`.
        scheduler: The LR scheduler(s) in use (optional): their class and settings go to
            `meta.json`, so that analysis knows a scheduled restart from a discontinuity.
        tensorboard: A folder to mirror the run to as TensorBoard scalars while it trains (the
            tags of `spikedoc tensorboard`; written on the writer's thread, never the loop's).
        budget: Largest share of the step time the monitor may take (default 2%): loss, LR and
            exact gradient norms every step, the full statistics (update norms, gradient maxima,
            optimizer state) on a cadence that keeps within it, and every step again for 50 steps
            after a flagged spike. None: the full statistics every step, whatever they cost.

    Returns:
        The Monitor; close it (or use it as a context manager) when training ends. Open monitors
        are also closed at interpreter exit.

    Example:
        >>> import tempfile, torch, spikedoc
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> monitor = spikedoc.watch(model, opt, run_dir=tempfile.mkdtemp(), clip=1.0)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        >>> monitor.close()
    """
    config = WatchConfig(every=every, layer_every=layer_every, clip=clip, flush_every=flush_every,
                         flush_seconds=flush_seconds, start_step=start_step, start_sample=start_sample, pad_token_id=pad_token_id,
                         tensorboard=None if tensorboard is None else str(tensorboard), budget=budget)  # fmt: skip
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if not optimizers:
        raise ValueError("watch: optimizer is an empty list; pass the optimizer(s) that step the model")
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer must be a torch.optim.Optimizer or a list of them, got {type(opt).__name__}")
    owned = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    if len(optimizers) > 1 and len(set(owned)) < len(owned):
        raise ValueError("watch: the optimizers share parameters (or one is listed twice); each tensor must have one owner")
    if run_dir is None:
        run_dir = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    return Monitor(model, optimizers if len(optimizers) > 1 else optimizers[0], run_dir, config, scaler=scaler,
                   scheduler=scheduler)
