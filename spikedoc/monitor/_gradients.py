"""When a step's gradient statistics are taken, and taken again when the gradients changed since.

Three moments can take them: the loop's own `clip_grad_norm_` (just before it scales them), a
caller asking for the step's norm (`Monitor.grad_norm`, the guard), or the optimizer's step
pre-hook. Whichever comes first takes them once; a later moment reuses them unless the gradients'
version counters say a backward ran in between.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spikedoc.monitor._caller import caller_stacklevel
from spikedoc.monitor._collect import StepContext, grad_stats, total_norm
from spikedoc.monitor._step import StepRecord
from spikedoc.monitor._transfer import Packer
from spikedoc.monitor.distributed import is_sharded, local
from spikedoc.monitor.statistics import clip_coefficient

__all__ = ["StepGradients"]


class StepGradients:
    """Takes one step's gradient statistics at the first moment that needs them.

    Args:
        context: The step context the statistics run in (its `plan` may be replaced).
        replan: Rebuild the plan (the optimizer gained parameter groups since it was made).
        fail: Report a failed statistic: the step's rows are dropped, training goes on.
    """

    def __init__(self, context: StepContext, replan: Callable[[], None],
                 fail: Callable[[str, BaseException, StepRecord | None], None]) -> None:  # fmt: skip
        self.context = context
        self._replan = replan
        self._fail = fail
        self._warned_changed = False
        self.loop_clip: float | None = None
        """The max norm of the loop's own norm clip on the last step it clipped (the smallest of several)."""

    def versions(self) -> list[int]:
        """The gradients' version counters (-1 for a missing gradient): a backward bumps them."""
        return [-1 if p.grad is None else local(p.grad)._version for p in self.context.plan.params]

    def replan_if_groups_changed(self) -> None:
        plan = self.context.plan
        if sum(len(g["params"]) for g in self.context.optimizer.param_groups) != len(plan.params):
            self._replan()  # add_param_group() since watch()

    def take_now(self, st: StepRecord) -> None:
        """Take them now (the gradients are about to change), unless they stand."""
        if st.grads_taken and st.clipped_versions == self.versions():
            return  # taken again with nothing in between: the statistics stand
        if st.grads_taken:  # a backward since they were taken (one clip per micro-batch): start over
            forget(st)
        self._take(st)

    def norms(self, st: StepRecord) -> list[Tensor] | None:
        """Per bucket, the step's per-tensor gradient norms before clipping, taken now unless they stand."""
        try:
            if st.broken:  # its statistics are lost: measure on a record that keeps none
                st = StepRecord(index=st.index, logged=False, layers=False, fingerprint=st.fingerprint)
            self.forget_if_changed_after_clip(st)
            if st.grads_taken and st.grad_norms is None:
                forget(st)  # left for the post-step job: taken now instead
            if not st.grads_taken:
                self._take(st, grad_scale=getattr(self.context.optimizer, "grad_scale", None))
            if not st.grad_norms:
                raise RuntimeError("no gradient norms were taken")
            return st.grad_norms
        except Exception as exc:  # noqa: BLE001 - monitoring never stops training
            self._fail("grad_norms", exc, st)
            return None

    def total(self, st: StepRecord) -> Tensor | None:
        """The step's global gradient norm before clipping, computed once per step."""
        layer_norms = self.norms(st)
        if layer_norms is None:
            return None
        if st.grad_norms is layer_norms:
            if st.total_grad_norm is None:
                st.total_grad_norm = total_norm(layer_norms)
            return st.total_grad_norm
        return total_norm(layer_norms)

    def per_tensor(self, st: StepRecord) -> tuple[Tensor, list[Tensor]] | None:
        """The step's per-tensor gradient norms before clipping, and their parameters, in that order."""
        layer_norms = self.norms(st)
        if layer_norms is None:
            return None
        per_tensor = torch.cat([n.to(layer_norms[0].device) for n in layer_norms])
        return per_tensor, [p for bucket in self.context.plan.buckets for p in bucket.sources]

    def on_loop_clip(self, st: StepRecord, params: list[Tensor], max_norm: float, total_norm: Tensor | None) -> None:
        """The loop's own clip: before it (`total_norm` None) take the statistics; after it note its coefficient."""
        if not any(id(p) in self.context.plan.param_ids for p in params):
            return  # another model's parameters
        if total_norm is None:
            self.take_now(st)
            return
        total_norm = total_norm.detach()
        if is_sharded(total_norm) or local(total_norm) is not total_norm:
            total_norm = total_norm.full_tensor()  # the clip's own norm, of the full gradients
        st.loop_clips.append((clip_coefficient(total_norm, max_norm), max_norm))
        st.clipped_versions = self.versions()
        self.loop_clip = min(norm for _, norm in st.loop_clips)

    def forget_if_changed_after_clip(self, st: StepRecord) -> None:
        """Gradients changed between the loop's last clip and now (a backward after the clip): the
        statistics from before the clip are not this step's; forget them and say so once."""
        if st.clipped_versions is None or st.clipped_versions == self.versions():
            return
        if not self._warned_changed:
            self._warned_changed = True
            warnings.warn(
                "spikedoc: the gradients changed after clip_grad_norm_ and before optimizer.step() (a backward() "
                "after the clip?); grad_norm of such steps is measured at the step, after clipping",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )
        forget(st)
        st.clipped_versions = None

    def _take(self, st: StepRecord, grad_scale: Any = None) -> None:
        self.replan_if_groups_changed()
        grad_stats(self.context, st, clip=None, grad_scale=grad_scale, now=True)


def forget(st: StepRecord) -> None:
    """Forget a step's gradient statistics (taken before the step hooks ran)."""
    # Until the step hooks run, the packer holds only gradient statistics (the rest is queued
    # after the step): a fresh one forgets the stale ones.
    st.grads_taken = False
    st.grad_work = None
    st.grad_norms = st.total_grad_norm = None
    st.packer = Packer()

