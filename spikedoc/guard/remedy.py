"""What a rollback changes for the replay, decided as data: LR scale or hold, clipping, skipped batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from spikedoc.analysis.causes import clip_kept_because, tighter_clip
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Decision

__all__ = ["Remedy", "plan_remedy", "implicated", "reset_implicated"]

#: A tensor is implicated in an incident when its gradient norm at onset is this many times its
#: median over the steps before.
IMPLICATED_RATIO = 4.0


@dataclass(kw_only=True)
class Remedy:
    """The guard's policy after a rollback, and what changed."""

    clip: float | None
    """Clipping norm from now on."""
    lr_scale: float
    """The schedule in use is the original times this (factors of all rollbacks multiplied)."""
    hold: dict[str, Any] | None
    """`{"from_step", "caps"}`: from that step the applied LR of each group is at most its cap."""
    skip_positions: list[int] = field(default_factory=list)
    """Data positions to skip from now on (added to those skipped already)."""
    skip_sample_ids: list[Any] = field(default_factory=list)
    held_now: bool = False
    """This rollback started the hold (the cause was an LR jump)."""
    clip_kept: str | None = None
    """Why clipping was not tightened, when it was not (it already acted on most steps)."""

    def evidence(self, *, clip_before: float | None, jump: dict[str, Any] | None) -> dict[str, Any]:
        """Plain fields for the rollback event."""
        out: dict[str, Any] = {"clip_before": clip_before, "clip": self.clip, "lr_scale": self.lr_scale,
                               "skipped_positions": self.skip_positions, "skipped_sample_ids": self.skip_sample_ids[:256]}  # fmt: skip
        if self.clip_kept is not None:
            out["clip_kept"] = self.clip_kept
        if self.held_now and self.hold is not None:
            out["lr_held"] = {"from_step": self.hold["from_step"], "at": self.hold["caps"], "jump": jump}
        return out


def plan_remedy(
    decision: Decision,
    *,
    config: GuardConfig,
    clip: float | None,
    lr_scale: float,
    hold: dict[str, Any] | None,
    batches: dict[int, tuple[list[int], list[Any]]],
    clipped: tuple[float, int] = (0.0, 0),
    data: bool | None = None,
) -> Remedy:
    """The replay's settings after rolling back for `decision`.

    An LR jump in the lookback (cause `lr_schedule`) is repaired, not trained around: the applied LR
    is held at its level before the jump, and the peak LR, clipping and data stay (as `analyze`
    recommends for a repair cause). Collapsed optimizer second moments (cause `optimizer_state`)
    are repaired by the good state itself: nothing else changes (the data and the schedule were not
    at fault). Anything else: the schedule times `lr_factor`, clipping
    tightened (`tighter_clip`: unless it already acts on most steps), the attributed batches
    skipped with `skip_window` on either side. A replay (`replay.py`) narrows that: batches shown at
    fault (`data=True`) are skipped with nothing else changed (the LR hold of a jump kept), batches
    shown ordinary on a good state (`data=False`) are not skipped.

    Args:
        decision: The judgement's rollback decision.
        config: The guard's settings.
        clip: Clipping norm in use.
        lr_scale: LR scale in use.
        hold: LR hold in use, if any.
        batches: step -> (data positions of its batches, sample ids) of the steps the guard remembers.
        clipped: Share of the healthy steps before the incident that `clip` clipped, and their count:
            a clip that acts on most steps is kept (`tighter_clip`).
        data: What a same-batch replay showed: the batches at fault (True), ordinary (False), or
            None when none ran.

    Example:
        >>> d = Decision(reason="vetoes", onset_step=5, precursor_step=5, cause="damage", attributed_steps=[5])
        >>> plan_remedy(d, config=GuardConfig(), clip=1.0, lr_scale=1.0, hold=None, batches={5: ([7], ["a"])}).skip_positions
        [7]
    """
    jump = decision.lr_jump
    positions, ids = _attributed(decision, batches, config.skip_window) if data is not False else ([], [])
    if decision.cause == "lr_schedule" and jump is not None and jump.get("lrs_before"):
        # The LRs applied before the jump (already at the scale in use).
        held = {"from_step": int(jump["step"]), "caps": [float(v) for v in jump["lrs_before"]]}
        if data is not True:
            positions, ids = [], []
        return Remedy(clip=clip, lr_scale=lr_scale, hold=held, held_now=True, skip_positions=positions, skip_sample_ids=ids)
    if decision.cause == "optimizer_state":
        return Remedy(clip=clip, lr_scale=lr_scale, hold=hold)
    if data is True:  # the batches alone: skipped, the rest as it was
        return Remedy(clip=clip, lr_scale=lr_scale, hold=hold, skip_positions=positions, skip_sample_ids=ids)
    factor = config.lr_factor
    if hold is not None:  # a hold set earlier scales with the schedule
        hold = {"from_step": hold["from_step"], "caps": [c * factor for c in hold["caps"]]}
    tighter = tighter_clip(clip, clipped_share=clipped[0])
    return Remedy(clip=tighter if tighter is not None else clip, lr_scale=lr_scale * factor, hold=hold,
                  skip_positions=positions, skip_sample_ids=ids,
                  clip_kept=clip_kept_because(clip, *clipped) if tighter is None else None)  # fmt: skip


def _attributed(decision: Decision, batches: dict[int, tuple[list[int], list[Any]]], window: int) -> tuple[list[int], list[Any]]:
    """The data positions (with `window` on either side) and sample ids of the decision's attributed steps."""
    positions: list[int] = []
    ids: list[Any] = []
    for step in decision.attributed_steps:
        if step in batches:
            step_positions, sample_ids = batches[step]
            for position in step_positions:
                positions += range(max(0, position - window), position + window + 1)
            ids += sample_ids
    return sorted(set(positions)), ids


def implicated(onset: Tensor, before: list[Tensor]) -> list[bool]:
    """Per tensor: its gradient norm at onset is `IMPLICATED_RATIO` times its median over `before`.

    Example:
        >>> implicated(torch.tensor([1.0, 9.0]), [torch.tensor([1.0, 1.0])] * 3)
        [False, True]
    """
    typical = torch.stack(before).median(dim=0).values  # (n,)
    return (onset > IMPLICATED_RATIO * typical).tolist()


def reset_implicated(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    decision: Decision,
    norms: dict[int, tuple[Tensor, list[Tensor]]],
) -> list[str]:
    """Drop the optimizer state of the tensors whose gradient norm led the incident; returns their names.

    A dropped state is re-initialised by the optimizer (Adam with its bias correction); zeroing the
    moments while keeping the step count would instead make the next update huge.

    Args:
        model: For the tensors' names.
        optimizer: Whose state is dropped.
        decision: The rollback's decision (its onset and precursor steps).
        norms: step -> (per-tensor gradient norms, the parameters in that order) of remembered steps.
    """
    if decision.onset_step not in norms:
        return []
    onset, params = norms[decision.onset_step]
    before = [n for s, (n, ps) in sorted(norms.items()) if s < decision.precursor_step and len(ps) == len(params)][-20:]
    if not before:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    reset = []
    for p, hit in zip(params, implicated(onset, before)):  # one sync, at rollback only
        if hit and p in optimizer.state:
            del optimizer.state[p]
            reset.append(names.get(id(p), "?"))
    return reset
