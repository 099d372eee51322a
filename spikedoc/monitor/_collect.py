"""Device side of a step: queue every statistic of one optimizer step, then start its host copy.

Runs in the optimizer step hooks. Everything here is batched tensor work on the parameters' devices;
the results go into the step's `Packer`, which copies them to the host in one transfer per device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from spikedoc.monitor._optim import Bucket
from spikedoc.monitor._step import Late, StepRecord
from spikedoc.monitor.statistics import (
    clip_coefficient,
    max_abs,
    nonfinite_counts,
    norms,
)

if TYPE_CHECKING:
    from spikedoc.monitor.monitor import Monitor

__all__ = ["grad_stats", "post_stats"]


@torch.no_grad()
def grad_stats(monitor: Monitor, st: StepRecord, *, clip: float | None, grad_scale: Any = None) -> None:
    """Before the step: gradient norms, maxima, non-finite counts; clipping; the optimizer's snapshot."""
    layer_norms = []
    for b, bucket in enumerate(monitor._buckets):
        grads = [p.grad for p in bucket.params]
        active = None
        if any(g is None for g in grads):
            active = [j for j, g in enumerate(grads) if g is not None]
            grads = [g if g is not None else monitor._placeholders[b] for g in grads]
        st.active[b], st.grads[b] = active, grads
        gn = norms(grads)  # (n,)
        if isinstance(grad_scale, Tensor):  # fused optimizers unscale inside step()
            gn = gn / grad_scale.to(gn.device, torch.float32)
        layer_norms.append(gn)
        if not st.work:
            continue
        st.packer.add(f"{b}:grad_norm", gn)
        cpu = bucket.device.type == "cpu"  # reading the norms costs nothing there
        st.packer.add(f"{b}:nonfinite", nonfinite_counts(grads, bucket.chunks, l2=gn if cpu else None))
        if st.layers:
            gmax = max_abs(grads, bucket.chunks)
            if isinstance(grad_scale, Tensor):
                gmax = gmax / grad_scale.to(gmax.device, torch.float32)
            st.packer.add(f"{b}:grad_max", gmax)
            st.packer.add(f"{b}:param_norm_before", _param_norms_before(monitor, b, bucket))
        st.tokens[b] = monitor._stats.before(bucket, grads, active)
    if clip is not None and layer_norms:
        first = layer_norms[0].device
        total = torch.linalg.vector_norm(torch.cat([n.to(first) for n in layer_norms]))
        coef = clip_coefficient(total, clip)
        for b, bucket in enumerate(monitor._buckets):
            real = [g for g in st.grads[b] if g is not monitor._placeholders[b]]
            if real:
                torch._foreach_mul_(real, coef.to(bucket.device))
        if st.work:
            st.packer.add("clip_coef", coef)


def _param_norms_before(monitor: Monitor, b: int, bucket: Bucket) -> Tensor:
    cached = monitor._after_norms.get(b)
    # The previous step's after-norms are this step's before-norms unless a parameter was
    # modified in place since (a checkpoint load, a rollback): its version counter tells.
    if cached is not None and cached[1] == [p._version for p in bucket.params]:
        return cached[0]
    return norms(bucket.params)


def post_stats(monitor: Monitor, st: StepRecord, skipped: bool) -> None:
    """After the step: parameter and update norms, optimizer state, then the one host copy."""
    pk = st.packer
    with torch.no_grad():
        for b, bucket in enumerate(monitor._buckets):
            pn = norms(bucket.params)
            monitor._after_norms[b] = (pn, [p._version for p in bucket.params])
            pk.add(f"{b}:param_norm", pn)
            if skipped:
                continue
            got = monitor._stats.after(bucket, st.grads[b], st.active[b], st.tokens.get(b), layers=st.layers)
            for key, value in got.items():
                pk.add(f"{b}:{key}", value)
    for g, group in enumerate(monitor.optimizer.param_groups):
        lr = group.get("lr", math.nan)
        if isinstance(lr, Tensor):
            pk.add(f"lr:{g}", lr.float())
            lr = Late(f"lr:{g}")
        st.lrs.append(lr)
    if st.loss_sum is not None:
        pk.add("loss_sum", st.loss_sum)
    scale = getattr(monitor.scaler, "_scale", None)
    if isinstance(scale, Tensor):
        pk.add("loss_scale", scale.float())
    for key, value in st.fingerprint.device_values().items():
        pk.add(f"fp:{key}", value)
    st.landing = pk.launch()
