"""Scale a whole LR schedule in place, and hold the applied LR below a level.

Every value a scheduler computes the LR from is scaled together, so the remaining schedule is the
old one times a factor at every step, with no discontinuity: the optimizer groups' `lr` and
`initial_lr` (and OneCycleLR's `max_lr`/`min_lr`, CyclicLR's `max_lr`), the scheduler's `base_lrs`
and `_last_lr`, floors such as `eta_min` and `min_lrs`, and the schedulers a SequentialLR or
ChainedScheduler holds. Closed forms (LambdaLR, and so Hugging Face's warmup schedules) scale
through `base_lrs`; recursive ("chainable") forms are homogeneous in the LR once their floor is
scaled too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["scale_schedule", "group_lrs", "apply_lrs"]

#: Per-group keys holding an LR a scheduler reads (OneCycleLR: initial/max/min; CyclicLR: max_lr).
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes holding LRs (lists per group or one number).
_SCHEDULER_KEYS = ("base_lrs", "_last_lr", "eta_min", "min_lrs", "max_lrs")


def scale_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply the optimizer's LRs and everything `scheduler` derives them from by `factor`.

    Args:
        optimizer: The optimizer whose param groups carry the LR.
        scheduler: Its LR scheduler (any torch.optim.lr_scheduler class, nested ones included), or None.
        factor: The multiplier, e.g. 0.7.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        >>> scale_schedule(opt, sched, 0.5); opt.param_groups[0]["lr"], sched.base_lrs
        (0.5, [0.5])
    """
    for group in optimizer.param_groups:
        for key in _GROUP_KEYS:
            if key in group:
                group[key] = _scaled(group[key], factor)
    if scheduler is not None:
        _scale_scheduler(scheduler, factor, seen=set())


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for key in _SCHEDULER_KEYS:
        value = getattr(scheduler, key, None)
        if isinstance(value, list):
            setattr(scheduler, key, [_scaled(v, factor) for v in value])
        elif isinstance(value, (int, float, Tensor)) and not isinstance(value, bool):
            setattr(scheduler, key, _scaled(value, factor))
    for child in getattr(scheduler, "_schedulers", None) or []:
        _scale_scheduler(child, factor, seen)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, Tensor):
        return value.mul_(factor)  # in place: a capturable optimizer holds on to this tensor
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    return value


def group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The current LR of each param group, as floats (a tensor LR costs a sync)."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def apply_lrs(optimizer: torch.optim.Optimizer, factor: float, caps: list[float] | None) -> list[Any] | None:
    """Scale each group's LR by `factor`, then lower it to at most its cap (if `caps`), in place;
    returns the previous values to restore after the optimizer's step, or None when nothing changed.

    Whatever set the LR (a scheduler, or the loop by hand: `group["lr"] = get_lr(it)`), the step
    applies the guard's LR factor and hold to it, and the loop's own value is back afterwards.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> before = apply_lrs(opt, 0.7, [0.5]); opt.param_groups[0]["lr"], before
        (0.5, [1.0])
    """
    if factor == 1.0 and caps is None:
        return None
    before = [g["lr"] for g in optimizer.param_groups]
    applied = [float(lr) * factor for lr in before]  # a tensor LR costs a sync
    if caps is not None:
        applied = [min(lr, cap) for lr, cap in zip(applied, caps)]
    if all(lr == float(b) for lr, b in zip(applied, before)):
        return None
    for group, lr in zip(optimizer.param_groups, applied):
        group["lr"] = lr if not isinstance(group["lr"], Tensor) else group["lr"].clone().fill_(lr)
    return before
