"""StepGate: the optimizer's step hooks through which the guard vetoes a step or scales its LR.

The gate registers a step pre-hook and post-hook on the (torch) optimizer, so it composes with
anything else that wraps `optimizer.step`: an LR scheduler's counting wrapper (built before or
after the guard), a GradScaler's `scaler.step(optimizer)`, Accelerate's `AcceleratedOptimizer`,
which all end in the optimizer's own `step()` and so in its hooks. A torch pre-hook cannot skip
the step it precedes; a veto lets the step run with no gradients instead: every parameter whose
`grad` is None is left alone by torch's optimizers (its update, weight decay and per-parameter
step counter included), and the gradients are put back by the post-hook. Group-level values an
optimizer might advance on its own (a schedule-free optimizer's counters) are put back too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spikedoc.guard.schedule import apply_lrs

__all__ = ["StepGate", "unwrapped"]


class StepGate:
    """Calls `on_step(gate)` before every `optimizer.step()`; during it, `veto()` and `scale_lrs()`
    act on that one call, and a post-hook undoes both after every other post-hook has run (the
    loop's gradients and LRs are back when `step()` returns).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        >>> opt.param_groups[0]["params"][0].grad = torch.ones(1)
        >>> gate = StepGate(opt, lambda g: g.veto())
        >>> opt.step(); opt.param_groups[0]["params"][0].item()
        1.0
        >>> gate.remove()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, on_step: Callable[[StepGate], None]) -> None:
        self.optimizer = optimizer
        self._on_step = on_step
        self._grads: list[tuple[Tensor, Tensor]] = []
        self._groups: list[dict[str, Any]] | None = None
        self._lrs: list[Any] | None = None
        self._pre_handle = optimizer.register_step_pre_hook(self._pre)
        self._post_handle: Any = None

    def veto(self) -> None:
        """The `step()` under way applies nothing: it runs with every gradient set aside."""
        params = (p for group in self.optimizer.param_groups for p in group["params"])
        self._grads += [(p, p.grad) for p in params if p.grad is not None]
        for p, _ in self._grads:
            p.grad = None
        if self._groups is None:
            self._groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]

    def scale_lrs(self, factor: float, caps: list[float] | None) -> None:
        """The `step()` under way applies each group's LR times `factor`, at most its cap (`apply_lrs`)."""
        restore = apply_lrs(self.optimizer, factor, caps)
        if restore is not None and self._lrs is None:
            self._lrs = restore

    def remove(self) -> None:
        """Remove the hooks (anything a step left set aside is put back first). Idempotent."""
        self._undo()
        self._pre_handle.remove()
        if self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._undo()  # a step that raised after its pre-hooks left these set aside
        if self._post_handle is not None:  # the last call's (not removable while the post-hooks ran)
            self._post_handle.remove()
            self._post_handle = None
        self._on_step(self)
        if self._grads or self._groups is not None or self._lrs is not None:
            # Registered now, so it runs after every other post-hook (the monitor's reads the applied LR).
            self._post_handle = optimizer.register_step_post_hook(self._post)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._undo()

    def _undo(self) -> None:
        for p, grad in self._grads:
            p.grad = grad
        self._grads = []
        if self._groups is not None:
            for group, saved in zip(self.optimizer.param_groups, self._groups):
                group.update(saved)
            self._groups = None
        if self._lrs is not None:  # the loop's own value again: only the applied LR is scaled
            for group, lr in zip(self.optimizer.param_groups, self._lrs):
                group["lr"] = lr
            self._lrs = None


def unwrapped(optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The torch optimizer and scheduler inside wrappers such as Accelerate's `AcceleratedOptimizer`
    and `AcceleratedScheduler`: the guard judges, checkpoints and scales those, and the gate's hooks
    sit on the inner optimizer, whose `step()` the wrapper's own reaches (with its GradScaler)."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # fmt: skip
        optimizer = optimizer.optimizer
    lr_scheduler = torch.optim.lr_scheduler.LRScheduler
    while scheduler is not None and not isinstance(scheduler, lr_scheduler) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return optimizer, scheduler
