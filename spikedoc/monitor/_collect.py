"""Device side of a step: queue every statistic of one optimizer step, then start its host copy.

Runs from the optimizer step hooks, on the training thread: clipping, the snapshot before the step
and, right after it, the gradient statistics (the step leaves gradients unchanged), then parameter,
update and optimizer-state statistics. On an accelerator they are kernels queued on its stream; the
results go into the step's `Packer`, which copies them to the host in one transfer per device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from spikedoc.monitor._optim import AfterStep, Bucket
from spikedoc.monitor._plan import Plan
from spikedoc.monitor._step import DeferredKey, StepRecord
from spikedoc.monitor.distributed import local
from spikedoc.monitor.statistics import (
    clip_coefficient,
    max_abs,
    nonfinite_counts,
    norms,
)

__all__ = ["StepContext", "grad_stats", "post_stats", "run_job", "total_norm"]


@dataclass(kw_only=True)
class StepContext:
    """What a step's statistics need from the monitor that runs them."""

    plan: Plan
    """The watched parameters and how their statistics are batched (replaced when groups change)."""
    optimizer: Any
    """The optimizer (or several read as one): its param groups give the learning rates."""
    scaler: Any
    """The GradScaler, if any: its scale is recorded with the step."""
    fail: Callable[[str, BaseException, StepRecord | None], None]
    """Report a failed statistic: its step's rows are dropped, training goes on."""
    grads_before_step: bool = False
    """Set once the step or the loop is seen changing gradients in place right after the step:
    their statistics are taken before it from then on."""


class ChangedDuringStats(RuntimeError):
    """A tensor the statistics read was modified in place while they were being computed."""


def _versions(tensors: list[Tensor]) -> list[int]:
    return [t._version for t in tensors]


def run_job(ctx: StepContext, st: StepRecord, where: str, body: Callable[[], None]) -> None:
    """Run `body` now, on the training thread; a failure loses the step's rows, never the run.

    Inline, the statistics read the tensors at the moment the hook runs: nothing can change them
    meanwhile (a worker thread measured costlier when every core is busy, and a loop's `.data`
    writes slip past the version counters that guarded it).
    """
    try:
        with torch.no_grad():
            body()
    except Exception as exc:  # noqa: BLE001 - monitoring never stops training
        ctx.fail(where, exc, st)


@torch.no_grad()
def grad_stats(ctx: StepContext, st: StepRecord, *, clip: float | None, grad_scale: Any = None, now: bool = False) -> None:
    """Before the step: gradient norms, maxima, non-finite counts; clipping; the optimizer's snapshot.

    Without `clip` and with an optimizer whose step leaves gradients alone, the gradient statistics
    wait for the post-step job, which reads the gradients after the step (on CPU, rather than
    competing with the optimizer's own Python loop for the GIL); `clip` needs the norms first, so
    then all is done here. A loop seen zeroing gradients in place right after the step gets them
    here from then on. `now` takes them at once: the loop's own clip is about to change them.
    Statistics already taken for the step (at the loop's clip) are kept; `clip` then only clips.
    """
    if st.grads_taken:
        if clip is not None:
            _clip_only(ctx, st, clip)
        return
    st.grads_taken = True
    grads_of: dict[int, list[Tensor]] = {}
    for b, bucket in enumerate(ctx.plan.buckets):
        grads = [local(p.grad) for p in bucket.sources] if bucket.distributed else [p.grad for p in bucket.sources]
        active = None
        if any(g is None for g in grads):
            active = [j for j, g in enumerate(grads) if g is not None]
            grads = [g if g is not None else ctx.plan.placeholders[b] for g in grads]
        st.active[b], st.grads[b] = active, grads
        grads_of[b] = grads
        if st.work and st.full:
            st.snapshots[b] = ctx.plan.stats.before(bucket, grads, active)
    # Read right before the step, never carried over from the last one: the loop may have written
    # into the weights since through `.data` (an EMA swap, weight surgery), which no version counter sees.
    before = {b: norms(bucket.params) for b, bucket in enumerate(ctx.plan.buckets)} if st.layers and st.full else {}

    lean = not ctx.plan.sharded  # combining shards over ranks drops a key any rank lacks

    def body() -> list[Tensor]:
        layer_norms = []
        for b, bucket in enumerate(ctx.plan.buckets):
            layer_norms.append(_bucket_grad_stats(st, b, bucket, grads_of[b], before.get(b), grad_scale, lean))
        return layer_norms

    later = not now and clip is None and not isinstance(grad_scale, Tensor) and ctx.plan.stats.step_keeps_grads
    if later and st.work and not ctx.grads_before_step:
        # Version counters from now: a step or a loop that changes the gradients in place before
        # the job has read them is caught (see post_stats).
        all_grads = [g for b in sorted(grads_of) for g in grads_of[b]]
        st.grad_work = (body, all_grads, _versions(all_grads))
        return
    st.grad_norms = body()
    if clip is not None:
        _apply_clip(ctx, st, st.grad_norms, clip)


def _clip_only(ctx: StepContext, st: StepRecord, clip: float) -> None:
    """`clip=` on gradients whose statistics were taken earlier: their norms, unless the loop's own
    clip scaled the gradients since."""
    if st.grad_norms is not None and not st.loop_clips:
        _apply_clip(ctx, st, st.grad_norms, clip, total=st.total_grad_norm)
        return
    _apply_clip(ctx, st, [norms(st.grads[b]) for b in range(len(ctx.plan.buckets)) if b in st.grads], clip)


def total_norm(layer_norms: list[Tensor]) -> Tensor:
    """The global L2 norm of per-tensor norms (on the first one's device); 0 when there are none."""
    if not layer_norms:
        return torch.zeros(())
    if len(layer_norms) == 1:
        return torch.linalg.vector_norm(layer_norms[0])
    first = layer_norms[0].device
    return torch.linalg.vector_norm(torch.cat([n.to(first) for n in layer_norms]))


def _apply_clip(ctx: StepContext, st: StepRecord, layer_norms: list[Tensor], clip: float, total: Tensor | None = None) -> None:
    """Scale the gradients exactly as `clip_grad_norm_(params, clip)` would, given their per-tensor
    norms (and their global norm, when already computed)."""
    if not layer_norms:
        return
    coef = clip_coefficient(total if total is not None else total_norm(layer_norms), clip)
    for b, bucket in enumerate(ctx.plan.buckets):
        real = [g for g in st.grads.get(b, []) if g is not ctx.plan.placeholders[b]]
        if real:
            torch._foreach_mul_(real, coef.to(bucket.device))
    if st.work:
        st.packer.add("clip_coef", coef)


def _bucket_grad_stats(st: StepRecord, b: int, bucket: Bucket, grads: list[Tensor], before: Tensor | None,
                       grad_scale: Any, finite_counts_left_out: bool) -> Tensor:  # fmt: skip
    """One bucket's gradient statistics into the packer; returns its per-tensor gradient norms.

    With `finite_counts_left_out`, a CPU bucket whose norms are all finite packs no non-finite counts
    (the rows read a missing count as none): finite norms prove every element finite.
    """
    gn = norms(grads)  # (n,)
    if isinstance(grad_scale, Tensor):  # fused optimizers unscale inside step()
        gn = gn / grad_scale.to(gn.device, torch.float32)
    if not st.work:
        return gn
    st.packer.add(f"{b}:grad_norm", gn)
    if bucket.device.type != "cpu":
        st.packer.add(f"{b}:nonfinite", nonfinite_counts(grads, bucket.chunks))
    elif not (finite_counts_left_out and math.isfinite(float(gn.sum()))):  # reading the norms costs nothing on CPU
        st.packer.add(f"{b}:nonfinite", nonfinite_counts(grads, bucket.chunks, l2=gn))
    if st.layers and st.full:
        gmax = max_abs(grads, bucket.chunks)
        if isinstance(grad_scale, Tensor):
            gmax = gmax / grad_scale.to(gmax.device, torch.float32)
        st.packer.add(f"{b}:grad_max", gmax)
        if before is not None:
            st.packer.add(f"{b}:param_norm_before", before)
    return gn


def post_stats(ctx: StepContext, st: StepRecord, skipped: bool) -> None:
    """After the step: parameter and update norms, optimizer state, then the one host copy.

    The values a scheduler or the loop may change next (learning rates, hyperparameters, the loss
    scale) are read here, then the tensor work runs, all before the hook returns.
    """
    pk = st.packer
    for g, group in enumerate(ctx.optimizer.param_groups):
        # Schedule-Free warms up inside step() and logs the LR it used as `scheduled_lr`.
        lr = group.get("scheduled_lr", group.get("lr", math.nan))
        if isinstance(lr, Tensor):
            pk.add(f"lr:{g}", lr.detach().float().clone())  # a scheduler may change it in place next
            lr = DeferredKey(f"lr:{g}")
        st.lrs.append(lr)
    if st.loss_sum is not None:
        pk.add("loss_sum", st.loss_sum)
    for key, tensor in st.recorded_tensors:
        pk.add(key, tensor)
    if st.loop_clips:  # several clips in one step (parameter subsets): the strongest
        coefs = [c.float().to(st.loop_clips[0][0].device) for c, _ in st.loop_clips]
        pk.add("loop_clip_coef", torch.stack(coefs).amin())
    scale = getattr(ctx.scaler, "_scale", None)
    if isinstance(scale, Tensor):
        pk.add("loss_scale", scale.float().clone())
    for key, value in st.fingerprint.device_values().items():
        pk.add(f"fp:{key}", value)
    stats = ctx.plan.stats
    hyper = None if skipped or not st.full else stats.hyperparameters()
    st.optimizer_values = stats.step_values(hyper) if hyper is not None else {}
    grads = {b: st.grads.get(b, []) if stats.reads_grads_after else [] for b in range(len(ctx.plan.buckets))}
    active, snapshots = dict(st.active), dict(st.snapshots)
    deferred, st.grad_work = st.grad_work, None

    def body() -> None:
        if deferred is not None:
            grad_work, all_grads, grad_versions = deferred
            try:
                grad_work()
            except Exception as exc:  # noqa: BLE001 - reported as the pre-step statistics it is
                ctx.fail("step_pre", exc, st)
                return
            if _versions(all_grads) != grad_versions:
                ctx.grads_before_step = True
                raise ChangedDuringStats(
                    "gradients were changed in place by the step or right after it (zero_grad(set_to_none=False)?); "
                    "from now on their statistics are taken before the step"
                )
        for b, bucket in enumerate(ctx.plan.buckets):
            if not st.full:  # a cost budget's light step: parameters move slowly, their norms wait for a full one
                continue
            pk.add(f"{b}:param_norm", norms(bucket.params))
            if skipped:
                continue
            step = AfterStep(grads=grads[b], active=active.get(b), snapshot=snapshots.get(b), layers=st.layers,
                             hyper=hyper)  # fmt: skip
            got = stats.after(bucket, step)
            for key, value in got.items():
                pk.add(f"{b}:{key}", value)
        st.landing = pk.launch()

    run_job(ctx, st, "step_post", body)
