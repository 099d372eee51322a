"""Brute-force references: train with `watch` while keeping full copies of what the monitor summarises."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spikedoc
from tests.common.models import train

__all__ = ["StepCopy", "Together", "watched_run"]


@dataclass
class StepCopy:
    """Full copies around one optimizer step, keyed by parameter name."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """Gradients right before `optimizer.step()` (before any clipping by the monitor)."""
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Optimizer state after the step."""
    total_grad_norm: float = 0.0
    """What `clip_grad_norm_` returns for the gradients before the step."""
    loss: float = 0.0
    """Mean training loss of the step."""


class Together:
    """Several optimizers stepped as one, as a training loop does: `step()` and `zero_grad()` of each in turn."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next((opt.state[p] for opt in self.optimizers if p in opt.state), {})


def watched_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    run_dir: Path,
    steps: int,
    *,
    watch: dict[str, Any] | None = None,
    **train_kwargs: Any,
) -> tuple[spikedoc.Run, list[StepCopy]]:
    """Train `steps` steps under `spikedoc.watch`, returning the loaded run and the full copies."""
    named = dict(model.named_parameters())
    copies: list[StepCopy] = []
    together = Together(optimizer if isinstance(optimizer, list) else [optimizer])

    def before_step(i: int) -> None:
        c = StepCopy()
        c.grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}
        c.before = {n: p.detach().clone() for n, p in named.items()}
        c.total_grad_norm = float(torch.nn.utils.clip_grad_norm_(named.values(), float("inf")))  # scales by 1
        copies.append(c)

    def after_step(i: int) -> None:
        c = copies[-1]
        c.after = {n: p.detach().clone() for n, p in named.items()}
        c.state = {n: copy.deepcopy(together.state_of(p)) for n, p in named.items()}

    monitor = spikedoc.watch(model, optimizer, run_dir=run_dir, **(watch or {}))
    with monitor:
        losses = train(model, together, steps, before_step=before_step, after_step=after_step, **train_kwargs)
    for c, loss in zip(copies, losses):
        c.loss = loss
    assert monitor.dropped_rows == 0
    return spikedoc.load(run_dir), copies
