"""Batched statistics of an optimizer's update and of Adam's state: pure torch, no host syncs.

The same conventions as `spikedoc.monitor.statistics` (one bucket of tensors in, one float32 value
per tensor out, temporaries bounded by `Chunks`): update norms measured exactly from a snapshot or
computed from the optimizer's state, and Adam's moments, their eps share and maxima.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from spikedoc.monitor.statistics import Chunks, count_positive, square_sums

__all__ = ["adam_stats", "eps_limit", "sgd_update_norms"]


def _vector(values: Sequence[float], device: torch.device) -> Tensor:
    """A small float32 vector of host values on `device`, without a synchronising copy."""
    host = torch.tensor(list(values), dtype=torch.float32)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _update_norms(
    directions: list[Tensor],
    params: list[Tensor],
    scales: Sequence[float],
    decays: Sequence[float],
) -> tuple[list[Tensor], list[float]]:
    """Norms of `-(a * p_new + c * X) / (1 - a)` for each piece, overwriting `directions` (X).

    This is the parameter change of one step for SGD and Adam(W) given the new parameters and the
    step direction X with its scale c, and the decoupled decay factor a = lr * weight_decay (0 when
    decay is folded into the gradient): p_old = (p_new + c * X) / (1 - a). Requires c != 0 where
    a != 0 (c is a learning rate over a bias correction).

    Returns:
        Unscaled norms (0-dim tensors) and the factor each must be multiplied by.
    """
    # ||a p + c X|| = |c| * ||X + (a / c) p||: one in-place add per distinct a / c (usually one
    # per param group), no new buffer.
    ratios: dict[float, list[int]] = {}
    for i, a in enumerate(decays):
        if a != 0.0:
            ratios.setdefault(a / scales[i] if scales[i] else math.inf, []).append(i)
    for ratio, members in ratios.items():
        torch._foreach_add_([directions[i] for i in members], [params[i] for i in members], alpha=ratio)
    raw = list(torch._foreach_norm(directions, 2, dtype=torch.float32)) if directions else []
    factors = [abs(c / (1.0 - a)) if a != 1.0 else math.inf for c, a in zip(scales, decays)]
    return raw, factors


def _adam_update_norms(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    denoms: list[Tensor],
    scales: Sequence[float],
    decays: Sequence[float],
) -> tuple[list[Tensor], list[float]]:
    """`_update_norms` for Adam's direction `X = m / denom`, in one elementwise pass where it can.

    With decoupled decay (a != 0) `||a p + c X|| = |a| * ||p + (c / a) * m / denom||`: one
    `addcdiv` forms the whole sum, with no `m / denom` temporary to write and read back. Tensors
    without decay (or with an extreme c / a, which would overflow or vanish in float32) take the
    `m / denom` route.

    Returns:
        Unscaled norms (0-dim tensors) and the factor each must be multiplied by.
    """
    joint = [a != 0.0 and 1e-30 < abs(c / a) < 1e30 for c, a in zip(scales, decays)]
    pick = lambda ts, want: [t for t, j in zip(ts, joint) if j == want]  # noqa: E731
    raw: dict[bool, list[Tensor]] = {True: [], False: []}
    factors: dict[bool, list[float]] = {True: [], False: []}
    if any(joint):
        sums_ = torch._foreach_addcdiv(
            pick(params, True), pick(exp_avgs, True), pick(denoms, True),
            [c / a for c, a, j in zip(scales, decays, joint) if j],
        )  # fmt: skip
        raw[True] = list(torch._foreach_norm(sums_, 2, dtype=torch.float32))
        factors[True] = [abs(a / (1.0 - a)) if a != 1.0 else math.inf for a, j in zip(decays, joint) if j]
    if not all(joint):
        directions = list(torch._foreach_div(pick(exp_avgs, False), pick(denoms, False)))
        raw[False], factors[False] = _update_norms(
            directions, pick(params, False), pick(scales, False), pick(decays, False)
        )
    # Back to the input order.
    its = {k: iter(zip(raw[k], factors[k])) for k in (True, False)}
    merged = [next(its[j]) for j in joint]
    return [n for n, _ in merged], [f for _, f in merged]


def _fold_update(chunks: Chunks, raw: list[Tensor], factors: list[float]) -> Tensor:
    """Per-tensor update norms from per-piece unscaled norms and their factors."""
    scaled = torch.stack(raw) * _vector(factors, raw[0].device)
    return chunks.fold_sum(scaled.square()).sqrt() if chunks.split else scaled


_F32_INF_BITS = 0x7F800000  # bit pattern of float32 +inf; non-negative floats order like their bits
_WINDOW = np.arange(-64, 65, dtype=np.int64)
_limits: dict[tuple[float, float], float | None] = {}


def eps_limit(bc2_sqrt: float, eps: float) -> float | None:
    """Largest float32 `v >= 0` whose `sqrt(v) / bc2_sqrt` is at or below `eps` in torch's CPU arithmetic.

    Then "sqrt(v_hat) <= eps" is exactly "v <= limit": the eps count needs one comparison on `v`
    instead of a sqrt, a division and a subtraction. The limit is found by evaluating torch's own
    float32 sqrt and division on the 129 floats around `(eps * b)**2`. torch's CPU sqrt is not
    always correctly rounded (up to 0.75 ulp measured on AVX512, so an IEEE model of it would be off
    by a float), but an error below an ulp cannot carry a `v` dozens of floats away from the limit
    across eps; inside the window every float is checked, and the result must switch from "at or
    below" to "above" exactly once. None when that fails or the hyperparameters are degenerate (b
    or eps not positive and finite): the caller then falls back to the direct count.

    Example:
        >>> limit = torch.tensor([eps_limit(0.5, 1e-8)])
        >>> v = torch.cat([limit, limit.nextafter(torch.tensor([1.0]))])  # the limit and the next float32
        >>> (v.sqrt() / 0.5 <= 1e-8).tolist()
        [True, False]
    """
    key = (bc2_sqrt, eps)
    if key in _limits:
        return _limits[key]
    limit = None
    if 0.0 < bc2_sqrt < math.inf and 0.0 < eps < math.inf:
        with np.errstate(over="ignore"):  # a guess beyond float32 is clipped to +inf below
            guess = int(np.array((eps * bc2_sqrt) ** 2, dtype=np.float32).view(np.int32))
        bits = np.clip(guess + _WINDOW, 0, _F32_INF_BITS).astype(np.int32)
        cand = torch.from_numpy(bits.view(np.float32))  # 129 consecutive floats around the guess, ascending
        below = (cand.sqrt() / bc2_sqrt <= eps).tolist()  # the same float32 kernels as torch's CPU Adam
        k = below.index(False) if False in below else 0
        if k > 0 and not any(below[k:]):  # one switch, inside the window
            limit = float(cand[k - 1])
    if len(_limits) > 1024:  # bc2 changes every step early in training: keep the cache bounded
        _limits.clear()
    _limits[key] = limit
    return limit


def _count_at_most_cpu(
    tensors: list[Tensor], limits: list[float], out: list[Tensor] | None
) -> tuple[list[float], Tensor]:
    """Number of elements `<= limit` of each CPU tensor (NaN never counts), and each tensor's maximum.

    A tensor's minimum and maximum (one `aminmax` read, and the maximum is wanted anyway) settle the
    count of most tensors: 0 when the minimum is above the limit, all when the maximum is at or
    below it. Only the others are compared element by element, as 0/1 marks written to `out` (new
    buffers when None).
    Reading the extremes on the host is free on CPU; on an accelerator it would synchronise.
    """
    zero = torch.zeros((), dtype=tensors[0].dtype)
    extremes = [x for t in tensors for x in (torch.aminmax(t) if t.numel() else (zero, zero))]
    both = torch.stack(extremes).view(-1, 2)  # (tensors, [min, max])
    highs_t = both[:, 1]
    lo, hi = both.T.tolist()
    below = [0.0 if lo[j] > lim else float(t.numel()) if hi[j] <= lim else math.nan
             for j, (t, lim) in enumerate(zip(tensors, limits))]  # fmt: skip
    mixed = [j for j, c in enumerate(below) if math.isnan(c)]  # limits inside the range, or NaN
    if mixed:
        bufs = [out[j] if out is not None else torch.empty_like(tensors[j]) for j in mixed]
        marks = [torch.le(tensors[j], limits[j], out=o) for j, o in zip(mixed, bufs)]
        # The sum of 0/1 float32 marks is exact below 2**24 elements per piece.
        small = all(t.numel() < (1 << 24) for t in marks)
        counts = square_sums(marks) if small else [t.sum(dtype=torch.float64) for t in marks]
        for j, c in zip(mixed, torch.stack(counts).tolist()):
            below[j] = c
    return below, highs_t


def adam_stats(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    denom_sqs: Sequence[Tensor],
    *,
    steps: Sequence[float],
    lrs: Sequence[float],
    beta1s: Sequence[float],
    beta2s: Sequence[float],
    epss: Sequence[float],
    decays: Sequence[float],
    chunks: Chunks,
    count_eps: bool = True,
    update_norms: bool = True,
) -> dict[str, Tensor]:
    """Update norms and eps counts of an Adam/AdamW step, from the state after the step.

    Torch's Adam moves each parameter by `-(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)` with
    `bc_k = 1 - beta_k ** step`, after shrinking it by `1 - lr * weight_decay` when the decay is
    decoupled (AdamW). The same float arithmetic is repeated here per tensor with the tensor's own
    group hyperparameters.

    Args:
        params: Parameters after the step.
        exp_avgs: `exp_avg` state (m) after the step.
        denom_sqs: The second moment in the denominator: `exp_avg_sq`, or `max_exp_avg_sq` with
            amsgrad.
        steps: Each tensor's `state["step"]` after the step.
        lrs, beta1s, beta2s, epss: Each tensor's group hyperparameters.
        decays: `lr * weight_decay` for decoupled decay (AdamW), 0.0 for Adam's L2 decay.
        chunks: Batching plan of the tensors' sizes (bounds the two temporaries).
        count_eps: Also count the elements whose `sqrt(v_hat)` is above eps and sum `denom_sqs`.
        update_norms: Compute the update norms (False: the caller has them from a snapshot).

    Returns:
        `update_norm` (with `update_norms`): L2 norm of each parameter's change. With `count_eps` also `above_eps`, the
        number of elements whose bias-corrected `sqrt(v_hat)` is above eps (the rest is at or below
        it), and `denom_sq_sum`, the sum of `denom_sqs` (to float32 rounding); on CPU also
        `denom_sq_max`, the maximum of `denom_sqs`.
    """
    bc2_sqrt = [(1 - b2**t) ** 0.5 for b2, t in zip(beta2s, steps)]
    step_sizes = [lr / (1 - b1**t) for lr, b1, t in zip(lrs, beta1s, steps)]
    limits: list[float | None] = []
    if count_eps and params and params[0].device.type == "cpu":
        # On CPU the count compares v with a host-computed limit (see eps_limit); elsewhere the
        # device computes sqrt(v_hat) itself, whatever its sqrt and division round like.
        distinct = {key: eps_limit(*key) for key in set(zip(bc2_sqrt, epss))}  # usually one per group
        limits = [distinct[key] for key in zip(bc2_sqrt, epss)]
    by_limit = bool(limits) and all(lim is not None for lim in limits)
    raw: list[Tensor] = []
    factors: list[float] = []
    above: list[Tensor] = []
    above_host: list[float] = []  # CPU: counts read on the host
    sq_sums: list[Tensor] = []
    sq_maxes: list[Tensor] = []
    for b, batch in enumerate(chunks.batches):
        idx = [i for i, _, _ in batch]
        p, m, v = (chunks.views(b, t) for t in (params, exp_avgs, denom_sqs))
        eps = [epss[i] for i in idx]
        scales = [step_sizes[i] for i in idx]
        denom = list(torch._foreach_sqrt(v)) if update_norms or (count_eps and not by_limit) else None
        if denom is not None and count_eps and not by_limit:
            torch._foreach_div_(denom, [bc2_sqrt[i] for i in idx])  # sqrt(v_hat), as torch computes it
            # Count sqrt(v_hat) > eps: (x - eps) is positive exactly there (NaN counts too).
            above.extend(count_positive(torch._foreach_sub(denom, eps)))
            # sum(v) = sum(sqrt(v_hat) ** 2) * bc2, from the temporary at hand instead of a pass over v.
            sq_sums.extend(square_sums(denom))
            torch._foreach_add_(denom, eps)
        elif denom is not None:
            if count_eps:
                # sum(v) = sum(sqrt(v) ** 2) (to float32 rounding), from the temporary at hand while
                # it is in cache, instead of another pass over v.
                sq_sums.extend(square_sums(denom))
            # m / (sqrt(v) / b + eps) = b * m / (sqrt(v) + eps * b): one pass fewer; the factor b
            # moves into the step scale (equal to torch's arithmetic up to float rounding).
            torch._foreach_add_(denom, [epss[i] * bc2_sqrt[i] for i in idx])
            scales = [c * bc2_sqrt[i] for c, i in zip(scales, idx)]
        if update_norms:  # X = m / denom, the step is -step_size * X
            got, f = _adam_update_norms(p, m, denom, scales, [decays[i] for i in idx])  # type: ignore[arg-type]
            raw += got
            factors += f
        if count_eps and by_limit:
            # A spent `denom` can hold the 0/1 marks of the count.
            below, highs = _count_at_most_cpu(v, [limits[i] for i in idx], denom)  # type: ignore[misc]
            above_host += [t.numel() - c for t, c in zip(v, below)]
            sq_maxes.append(highs)
            if denom is None:  # no sqrt temporary to sum v from
                sq_sums.extend(t.sum(dtype=torch.float32) for t in v)
        del denom
    out = {"update_norm": _fold_update(chunks, raw, factors)} if update_norms else {}
    if count_eps and by_limit:
        out["above_eps"] = chunks.fold_sum(torch.tensor(above_host, dtype=torch.float64))
        out["denom_sq_sum"] = chunks.fold_sum(torch.stack(sq_sums))
        out["denom_sq_max"] = chunks.fold_max(torch.cat(sq_maxes).float())
    elif count_eps:
        out["above_eps"] = chunks.fold_sum(torch.stack(above))
        bc2 = [bc2_sqrt[i] ** 2 for batch in chunks.batches for i, _, _ in batch]
        out["denom_sq_sum"] = chunks.fold_sum(torch.stack(sq_sums) * _vector(bc2, sq_sums[0].device))
    return out


def sgd_update_norms(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor | None],
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    momentums: Sequence[float],
    nesterovs: Sequence[bool],
    maximizes: Sequence[bool],
    chunks: Chunks,
) -> Tensor:
    """Update norms of a torch SGD step, from the parameters, gradients and momentum after it.

    With momentum and no Nesterov the change is `-lr * buf`; otherwise it is
    `-(lr * wd * p_new + lr * (s * g + mu * buf)) / (1 - lr * wd)` with s = -1 under `maximize`,
    which undoes the L2 decay folded into the gradient.
    """
    full_bufs = [buf if buf is not None else p for buf, p in zip(buffers, params)]  # None only where mu = 0
    raw: list[Tensor] = []
    factors: list[float] = []
    for b, batch in enumerate(chunks.batches):
        idx = [i for i, _, _ in batch]
        p, g, buf = chunks.views(b, params), chunks.views(b, grads), chunks.views(b, full_bufs)
        sign = [-1.0 if maximizes[i] else 1.0 for i in idx]
        heavy = [momentums[i] != 0 and not nesterovs[i] for i in idx]
        # Heavy ball: the change is -lr * buf, a norm of the state. Otherwise X = g + s * mu * buf
        # with scale c = lr * s, in a fresh buffer whenever it will be modified (grads are the user's).
        fresh = [j for j, i in enumerate(idx) if not heavy[j] and (momentums[i] != 0 or weight_decays[i] != 0)]
        xs = dict(zip(fresh, torch._foreach_mul([g[j] for j in fresh], 1.0))) if fresh else {}
        nest = [j for j in fresh if momentums[idx[j]] != 0]
        if nest:
            torch._foreach_add_(
                [xs[j] for j in nest],
                torch._foreach_mul([buf[j] for j in nest], [sign[j] * momentums[idx[j]] for j in nest]),
            )
        got, f = _update_norms(
            [buf[j] if heavy[j] else xs.get(j, g[j]) for j in range(len(idx))],
            p,
            [lrs[i] * (1.0 if heavy[j] else sign[j]) for j, i in enumerate(idx)],
            [0.0 if heavy[j] else lrs[i] * weight_decays[i] for j, i in enumerate(idx)],
        )
        raw += got
        factors += f
    return _fold_update(chunks, raw, factors)
