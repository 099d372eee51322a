"""What the monitor gathers about one optimizer step between its first forward and its host row."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from spikedoc.monitor._transfer import Landing, Packer
from spikedoc.monitor.fingerprint import Fingerprint

__all__ = ["StepRecord", "DeferredKey", "deferred_value", "extract_loss"]


@dataclass(eq=False)
class StepRecord:
    """Everything gathered about one optimizer step, from its first forward to its host row."""

    index: int
    logged: bool
    layers: bool
    fingerprint: Fingerprint
    full: bool = True
    """Gets the full statistics (gradient maxima, update norms, optimizer state); see `budget.py`."""
    cost: float = 0.0
    """Seconds the monitor spent on this step, in its hooks."""
    forwards: int = 0
    loss_sum: Tensor | None = None
    loss_count: int = 0
    loss_shares: bool = False
    """The forwards were given `num_items_in_batch` (HF's convention): each micro-batch loss is its
    share of the step's loss, normalised by the items of the whole step, so the step loss is their sum."""
    recorded: dict[str, Any] = field(default_factory=dict)
    late: list[Landing] = field(default_factory=list)
    """Host copies of tensors given to `record()` after the step's own copy was launched."""
    recorded_tensors: list[tuple[str, Tensor]] = field(default_factory=list)
    """Tensors given to `record()` before the step ended: they travel in the step's own copy."""
    packer: Packer = field(default_factory=Packer)
    active: dict[int, list[int] | None] = field(default_factory=dict)
    grads: dict[int, list[Tensor]] = field(default_factory=dict)
    grad_work: tuple[Callable[[], Any], list[Tensor], list[int]] | None = None
    """Gradient statistics left for the post-step job, the gradients and their version counters."""
    snapshots: dict[int, Any] = field(default_factory=dict)
    """Per bucket, what the optimizer statistics took before the step (`OptimizerStats.before`): the
    state the update is measured against after it."""
    grads_taken: bool = False
    """Gradient statistics are taken (or left for the post-step job) for this step."""
    grad_norms: list[Tensor] | None = None
    """Per bucket, the per-tensor gradient norms the statistics took before the step (unscaled):
    `clip=` and `Monitor.grad_norm` reuse them rather than read the gradients again."""
    total_grad_norm: Tensor | None = None
    """Their global norm, once `Monitor.grad_norm` computed it (`clip=` reuses it)."""
    loop_clips: list[tuple[Tensor, float]] = field(default_factory=list)
    """The loop's own norm clips of this step: the coefficient each applied (device) and its max norm."""
    clipped_versions: list[int] | None = None
    """Gradient version counters right after the loop's last clip (a later change means stale statistics)."""
    broken: bool = False
    skipped: bool = False
    time: float = math.nan
    step_time: float = math.nan
    began: float = math.nan
    """`time.perf_counter()` at the step's first micro-batch (NaN when no forward was seen)."""
    busy_time: float = math.nan
    """Seconds from the first micro-batch to the end of the step: its own time, without the time
    between steps (data loading, evaluation, another job's work), which must not widen a cost budget."""
    lrs: list[Any] = field(default_factory=list)
    optimizer_values: dict[str, float] = field(default_factory=dict)
    """Step-table values an optimizer's statistics read right after the step (Schedule-Free's averaging weight)."""
    sample_offset: int = 0
    landing: Landing | None = None

    @property
    def work(self) -> bool:
        return self.logged or self.layers


class DeferredKey(str):
    """Stands in a row for a tensor value (a recorded scalar, a tensor LR) that reaches the host separately, later."""

    integer: bool = False
    """The tensor held integers (sample ids, counts): they travel as float64 and are made ints again."""


def extract_loss(output: Any) -> Tensor | None:
    """The loss in a forward's output, or None when there is none to be sure of.

    A scalar tensor; a mapping's `"loss"`; an object's `.loss` (HF style); or, in a tuple or list
    (nanoGPT's `(logits, loss)`, HF's `return_dict=False`), its only 0-dim floating tensor that
    requires grad. Never a loss guessed from logits.
    """
    if isinstance(output, Mapping):
        output = output.get("loss")
    elif isinstance(output, (tuple, list)):
        scalars = [t for t in output if isinstance(t, Tensor) and t.dim() == 0 and t.requires_grad]
        output = scalars[0] if len(scalars) == 1 else None
    elif not isinstance(output, Tensor):
        output = getattr(output, "loss", None)
    if isinstance(output, Tensor) and output.numel() == 1 and output.is_floating_point():
        return output
    return None


def deferred_value(st: StepRecord, value: Any, *, ongoing: bool) -> Any:
    """A value given to `record()` for step `st`: a tensor becomes a `DeferredKey` its host copy fills in.

    While the step is `ongoing` the tensor rides in the step's own host copy; once that copy is under
    way, in one of its own.
    """
    if not isinstance(value, Tensor):
        return value
    key = DeferredKey(f"rec:{len(st.recorded_tensors) + len(st.late)}")  # each tensor goes to one of them
    key.integer = not value.is_floating_point() and not value.is_complex()
    # Ids may sit in a buffer the loop refills: a copy of them as they are now.
    tensor = value.detach().float() if value.is_floating_point() else value.detach().clone()
    if ongoing:
        st.recorded_tensors.append((key, tensor))
    else:
        p = Packer()
        p.add(key, tensor)
        st.late.append(p.launch())
    return key
