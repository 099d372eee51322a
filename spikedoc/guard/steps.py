"""The steps the guard follows: the one under way (`PendingStep`) and those it remembers (`RecentSteps`)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from spikedoc.guard.judge import Decision, Verdict

__all__ = ["PendingStep", "Replay", "SeenStep", "RecentSteps"]

#: Recent steps whose batch position, sample ids and per-tensor gradient norms are remembered, to
#: name and skip an incident's batches: the lookback plus the recovery judgement's patience fit.
REMEMBERED_STEPS = 1024


@dataclass(kw_only=True)
class Replay:
    """A replay step (`replay.py`): which batches again, on which state, against which reference."""

    kind: str
    """`other_batches` (the last healthy step's) or `same_batches` (the suspect step's)."""
    on: str
    """`vetoed_state` (the state the vetoes came from, as it is) or `checkpoint` (the rollback's good one)."""
    of_step: int
    """The step whose batches these are."""
    positions: list[int]
    batches: list[Any]
    sample_offset: int
    """The monitor's sample offset of that step (its first batch's stream position, in samples)."""
    reference: float | None = None
    """On a checkpoint: the loss the checkpoint's own step had on its state (None: not recorded)."""


@dataclass(kw_only=True)
class PendingStep:
    """The step the loop is working on: from the batch handed out to the next one."""

    step: int
    positions: list[int]
    """Data positions of the step's batches (more than one under gradient accumulation)."""
    losses: list[Tensor] = field(default_factory=list)
    """Losses given to `record` this step (detached; a tensor of several elements as their mean)."""
    forward_losses: list[Tensor] = field(default_factory=list)
    """Losses the model's forwards returned this step (used when `record` gave none)."""
    sample_ids: list[Any] = field(default_factory=list)
    forwards: int = 0
    """Forwards with gradients this step (micro-batches: the accumulation the guard counts)."""
    batches: list[Any] = field(default_factory=list)
    """The batches handed out for it (when the guard hands them out): kept if it is applied healthy."""
    handed: int = 1
    sample_offset: int = 0
    """The monitor's sample offset when the step began (its first batch's stream position, in samples)."""
    probe: Decision | None = None
    """A replay step (`replay`): batches handed out again, judged and never applied, to test the
    cause of this decision before the guard acts on it."""
    replay: Replay | None = None
    """A replay step's batches, state and reference (set with `probe`)."""
    claim_draws: bool = False
    """Its batches are still to be taken from those the loop drew through `Guard.draw` (the first
    ones its forwards took): when it is judged, or when it ends unjudged."""
    verdict: Verdict | None = None
    lrs: list[float] | None = None

    def loss(self) -> Tensor | None:
        """The step's loss: the mean of those given to `record`, else of those the forwards returned."""
        losses = self.losses or self.forward_losses
        if len(losses) <= 1:
            return losses[0] if losses else None  # one micro-batch: no op at all
        device = losses[0].device
        return torch.stack([x.float().reshape(()).to(device) for x in losses]).mean()

    def add_record(self, loss: float | Tensor | None, sample_ids: Any) -> None:
        """What `Guard.record` was given for this step (a tensor of several elements counts as their mean)."""
        if isinstance(loss, Tensor) and loss.numel():
            self.losses.append(loss.detach() if loss.numel() == 1 else loss.detach().float().mean())
        elif loss is not None and not isinstance(loss, Tensor):
            self.losses.append(torch.tensor(float(loss)))
        if sample_ids is not None:
            self.sample_ids.extend(sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids))


@dataclass(kw_only=True)
class SeenStep:
    """A step the guard remembers, to name and skip an incident's batches and find its tensors."""

    step: int
    positions: list[int]
    """Data positions of its batches."""
    sample_ids: list[Any]
    grad_norms: tuple[Tensor, list[Tensor]] | None
    """Per-tensor gradient norms and the parameters in that order (kept when reset_moments=True)."""
    bad_loss: bool = False
    """Vetoed for its loss: non-finite or far out of band before the update (the batch looked bad)."""


class RecentSteps:
    """The last `REMEMBERED_STEPS` steps seen (a replayed step: its latest pass counts)."""

    def __init__(self) -> None:
        self._seen: deque[SeenStep] = deque(maxlen=REMEMBERED_STEPS)

    def add(self, p: PendingStep, grad_norms: tuple[Tensor, list[Tensor]] | None) -> None:
        """Remember a finished step."""
        v = p.verdict
        bad_loss = v is not None and v.veto and ("loss_out_of_band" in v.reasons or not math.isfinite(v.loss))
        self._seen.append(SeenStep(step=p.step, positions=p.positions, sample_ids=p.sample_ids, grad_norms=grad_norms,
                                   bad_loss=bad_loss))  # fmt: skip

    def between(self, first: int, end: int) -> list[SeenStep]:
        """The remembered steps `first` .. `end - 1`, their latest pass each."""
        latest = {seen.step: seen for seen in self._seen}
        return [latest[step] for step in range(first, end) if step in latest]

    def batches(self) -> dict[int, tuple[list[int], list[Any]]]:
        """step -> (data positions of its batches, sample ids)."""
        return {s.step: (s.positions, s.sample_ids) for s in self._seen}

    def grad_norms(self) -> dict[int, tuple[Tensor, list[Tensor]]]:
        """step -> (per-tensor gradient norms, the parameters in that order), where kept."""
        return {s.step: s.grad_norms for s in self._seen if s.grad_norms is not None}
