"""Agreement across ranks: every rank judges the same numbers, so every rank decides the same.

Under torch.distributed each step's judged values are summed over ranks by one all_reduce of a
small tensor: the loss (mean over ranks), each rank's own loss (in a slot of its own, zero on the
other ranks, so the sum gathers them), the gradient norm (mean; identical under DDP; under FSDP2
each rank sends its share of the squared global norm, and the root of their sum is the norm of the
full gradient), the count of ranks whose loss or gradient norm was non-finite, the count of
ranks that ask for a rollback, and the count of second-moment tensors found collapsed (`moments.py`).
Non-finite values are sent as 0 with their count, so one rank's NaN vetoes the step on every rank
without turning the others' sums into NaN. The guard's decisions are deterministic functions of
these agreed values, so all ranks veto, open incidents and roll back together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

__all__ = ["StepValues", "agree", "world", "agree_all", "common_steps", "rank_zero_last"]


class StepValues(NamedTuple):
    """The numbers one step is judged on, the same on every rank (a named tuple: one is built per step)."""

    loss: float
    """Mean loss over ranks; nan when any rank's was non-finite or no loss was given."""
    grad_norm: float
    """Global gradient norm (mean over ranks); nan when any rank's was non-finite."""
    nonfinite_ranks: int
    """Ranks whose loss or gradient norm was NaN or inf (the larger of the two counts)."""
    rollback_requests: int
    """Ranks that asked for a rollback (`Guard.request_rollback`)."""
    rank_losses: tuple[float, ...] = ()
    """Each rank's own loss, in rank order (nan where non-finite or not given); empty in one
    process. Under data parallelism each rank trains on its own batches: a bad batch on one rank
    is judged by that rank's loss, not diluted in the mean."""
    collapsed_moments: int = 0
    """Optimizer second-moment tensors (summed over ranks) that fell below what one update allows."""


def world() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed is initialised with more than one rank, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def agree(loss: Tensor | None, grad_norm: Tensor, *, rollback_request: bool, sharded: bool = False,
          collapsed: Tensor | None = None) -> StepValues:
    """Judge-ready values of this step: one host sync, plus one all_reduce under torch.distributed.

    Args:
        loss: This rank's loss of the step (a device scalar), or None when none was given.
        grad_norm: This rank's global gradient norm (a device scalar); with `sharded`, this rank's
            share of the squared global norm (`sharded.GlobalNorm.share`).
        rollback_request: This rank asks for a rollback.
        sharded: The gradients are split over ranks (FSDP2): the shares are summed and rooted
            instead of the norms averaged. Ignored outside torch.distributed.
        collapsed: This rank's count of collapsed second-moment tensors (a device scalar,
            `SecondMoments.measure`), or None when not checked.

    Example:
        >>> agree(torch.tensor(2.5), torch.tensor(0.3), rollback_request=False).loss
        2.5
    """
    ranks = world()
    if ranks is None:  # one rank: the finiteness checked on the host
        parts = [grad_norm, *(t for t in (loss, collapsed) if t is not None)]
        if all(t.is_cpu for t in parts):  # already on the host: nothing to copy
            got = [float(t) for t in parts]
        else:  # one stack, one host sync
            got = _stacked(parts, grad_norm.device).tolist()
        grad_v, loss_v = got[0], got[1] if loss is not None else math.nan
        loss_ok, grad_ok = math.isfinite(loss_v), math.isfinite(grad_v)
        return StepValues(loss_v if loss_ok else math.nan, grad_v if grad_ok else math.nan,
                          int(not grad_ok or (loss is not None and not loss_ok)), int(rollback_request),
                          collapsed_moments=round(got[-1]) if collapsed is not None else 0)
    rank, size = ranks
    device = grad_norm.device
    has_loss = loss is not None
    values = _stacked([loss if has_loss else torch.zeros((), device=device), grad_norm], device)  # (2,)
    finite = torch.isfinite(values)
    sent = torch.where(finite, values, torch.zeros_like(values))
    flags = torch.tensor([float(rollback_request), float(has_loss)], device=device)
    found = _stacked([collapsed], device) if collapsed is not None else torch.zeros(1, device=device)
    # This rank's loss and whether it counts (finite and given), in its own slots: the sum gathers them.
    own = torch.zeros(2, size, device=device)
    own[0, rank], own[1, rank] = sent[0], (finite[0] & has_loss).float()
    packed = torch.cat([sent, (~finite).float(), flags, found, own.flatten()])  # (7 + 2 * size,)
    summed = _all_reduce_sum(packed).tolist()  # the one host sync
    loss_sum, grad_sum, bad_loss, bad_grad, requests, with_loss, collapses = summed[:7]
    losses, counted = summed[7 : 7 + size], summed[7 + size :]
    return StepValues(
        loss=loss_sum / with_loss if with_loss and not bad_loss else math.nan,
        grad_norm=(math.sqrt(grad_sum) if sharded else grad_sum / size) if not bad_grad else math.nan,
        nonfinite_ranks=round(max(bad_loss, bad_grad)),
        rollback_requests=round(requests),
        rank_losses=tuple(v if ok else math.nan for v, ok in zip(losses, counted)),
        collapsed_moments=round(collapses),
    )


def _stacked(scalars: list[Tensor], device: torch.device) -> Tensor:
    """Scalar tensors as one float32 vector on `device`."""
    return torch.stack([t.detach().float().reshape(()).to(device) for t in scalars])


def agree_all(flag: bool) -> bool:
    """True on every rank when `flag` is True on all of them (e.g. "my checkpoint write succeeded")."""
    if world() is None:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=_collective_device())
    return _all_reduce_sum(t).item() == 0.0


def common_steps(steps: list[int]) -> list[int]:
    """The checkpoint steps every rank has (all of `steps` outside torch.distributed), newest first."""
    if world() is None:
        return sorted(set(steps), reverse=True)
    gathered: list[list[int] | None] = [None] * world()[1]
    torch.distributed.all_gather_object(gathered, sorted(set(steps)))
    shared = set(gathered[0] or [])
    for other in gathered[1:]:
        shared &= set(other or [])
    return sorted(shared, reverse=True)


def rank_zero_last(make: Callable[[], T]) -> T:
    """`make()` on every rank, on rank 0 only after every other rank's has returned (a barrier);
    outside torch.distributed, a plain call. E.g. a file rank 0 writes that the others read first."""
    if world() is None:
        return make()
    made = make() if world()[0] != 0 else None
    torch.distributed.barrier()
    return made if world()[0] != 0 else make()


def _all_reduce_sum(t: Tensor) -> Tensor:
    dist = torch.distributed
    target = _collective_device()
    moved = t.to(target)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU ones.
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
