"""The training state a guard checkpoint holds and a rollback or resume puts back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spikedoc.guard.checkpoint import host_copy
from spikedoc.guard.data import DataStream
from spikedoc.guard.draws import Draws
from spikedoc.guard.rng import rng_state, set_rng_state
from spikedoc.guard.schedule import scale_schedule
from spikedoc.guard.sharded import load_training_state, training_state

__all__ = ["TrainingState"]


@dataclass
class TrainingState:
    """What training is: the model, optimizer, scheduler and GradScaler, the data stream, the batches
    the loop holds and the random generators. `capture` copies it to the host; `load` puts it back.

    Example:
        >>> state = TrainingState(model, opt, sched, None, stream, Draws())  # doctest: +SKIP
        >>> payload = state.capture(); ...; state.load(payload)  # doctest: +SKIP
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    stream: DataStream
    draws: Draws

    def capture(self) -> dict[str, Any]:
        """A host copy of the state (the sections `held`, `model`, `optimizer`, `scheduler`,
        `scaler`, `rng`, `data` of a checkpoint), detached from the live one."""
        state = host_copy({
            "held": self.draws.held(),
            **training_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        })  # fmt: skip
        state.update(rng=rng_state(), data=self.stream.state_dict())
        return state

    def load(self, state: dict[str, Any]) -> bool:
        """Put back a captured state; False when the batches the loop holds could not all be
        written back (of another shape, or more than the checkpoint's loop held)."""
        load_training_state(self.model, self.optimizer, state)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # The source first (a re-iterable's fast-forward draws from the random generators), then
        # the generators: a source drawing from the global RNG draws the same batches again.
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return self.draws.restore(state.get("held") or [], self.device)

    @property
    def device(self) -> torch.device:
        """Where the model is (its first parameter's device): where held batches are put back."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def scale_schedule(self, factor: float) -> None:
        """With a scheduler, its whole schedule times `factor`; without one the factor is applied
        to the LR the loop sets at each step (`StepGate.scale_lrs`), and the optimizer's values stay."""
        if self.scheduler is not None:
            scale_schedule(self.optimizer, self.scheduler, factor)
