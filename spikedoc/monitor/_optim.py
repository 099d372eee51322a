"""Per-optimizer statistics: update norms and state summaries for Adam(W), SGD and anything else."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spikedoc.monitor.sampling import SampledSnapshot
from spikedoc.monitor.statistics import Chunks, maxes, norms, sums
from spikedoc.monitor.update_statistics import adam_stats, sgd_update_norms

__all__ = ["AfterStep", "Bucket", "OptimizerStats", "AdamStats", "SgdStats", "SampledStats"]


@dataclass(eq=False)
class Bucket:
    """The optimizer's parameters of one (device, dtype): the unit every batched op works on."""

    device: torch.device
    dtype: torch.dtype
    index: list[int]
    """Positions of these parameters in optimizer order (the layer table's row order)."""
    params: list[Tensor]
    """The tensors the statistics read: the optimizer's parameters, or their local shards (FSDP2)."""
    sources: list[Tensor]
    """The optimizer's parameters themselves (gradients are read from them)."""
    groups: list[int]
    """Param group of each parameter, within the optimizer that owns it."""
    chunks: Chunks
    numels: np.ndarray
    owner: int = 0
    """Index of the optimizer that steps these parameters (several optimizers: `watch(model, [a, b])`)."""
    in_order: bool = False
    """Whether `index` is 0, 1, 2, ...: this bucket holds every parameter, in optimizer order."""
    distributed: bool = False
    """Some of `sources` are DTensors: their gradients are read through their local shards."""
    _subsets: dict[tuple[int, ...], Chunks] = field(default_factory=dict)
    _fill: dict[float, Tensor] = field(default_factory=dict)

    def chunks_for(self, active: list[int] | None) -> Chunks:
        """Batching plan of the parameters at positions `active` (all when None)."""
        if active is None:
            return self.chunks
        key = tuple(active)
        if key not in self._subsets:
            self._subsets[key] = Chunks([int(self.numels[i]) for i in active], self.chunks.budget)
        return self._subsets[key]

    def expand(self, values: Tensor, active: list[int] | None, fill: float) -> Tensor:
        """Place per-active-tensor `values` into a bucket-sized vector, `fill` elsewhere."""
        if active is None:
            return values
        const = self._fill.get(fill)
        if const is None:
            const = self._fill[fill] = torch.tensor(fill, dtype=torch.float32, device=self.device)
        out = [const] * len(self.params)
        for j, v in zip(active, values.unbind()):
            out[j] = v
        return torch.stack(out)


@dataclass(frozen=True)
class AfterStep:
    """What `OptimizerStats.after` is given about one bucket's step."""

    grads: list[Tensor]
    """The gradients (placeholders where None), when the implementation reads them after the step."""
    active: list[int] | None
    """Positions of the parameters that had a gradient (None: all)."""
    snapshot: Any
    """What `before` returned for this step: the state the update is measured against."""
    layers: bool
    """Whether layer rows are recorded for this step."""
    hyper: Any
    """`hyperparameters()`, read right after the step."""


def _scalar(value: Any) -> float:
    return float(value)  # a tensor hyperparameter (capturable optimizers) is read here


def _steps(steps: Sequence[Any]) -> list[float]:
    if steps and all(isinstance(s, Tensor) and s.device == steps[0].device for s in steps):
        # One read: free for the usual CPU counters; one sync for capturable/fused optimizers,
        # which keep the counter on the GPU.
        return torch.stack(list(steps)).float().tolist()
    return [float(s) for s in steps]


def _adam_hyper(group: dict[str, Any], optimizer: torch.optim.Optimizer) -> tuple[float, float, float, float, float, bool]:
    """lr, beta1, beta2, eps, the decoupled decay factor `lr * weight_decay` (0 for L2 decay), amsgrad."""
    lr = _scalar(group["lr"])
    is_adamw = isinstance(optimizer, torch.optim.AdamW)  # torch < 2.6 has no group flag
    decoupled = bool(group.get("decoupled_weight_decay", is_adamw))
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    decay = lr * _scalar(group["weight_decay"]) if decoupled else 0.0
    return lr, beta1, beta2, _scalar(group["eps"]), decay, bool(group.get("amsgrad", False))


def _sgd_hyper(group: dict[str, Any]) -> tuple[float, float, float, bool, bool]:
    """lr, weight_decay, momentum, nesterov, maximize."""
    return (_scalar(group["lr"]), _scalar(group["weight_decay"]), _scalar(group["momentum"]),
            bool(group["nesterov"]), bool(group.get("maximize", False)))  # fmt: skip


class OptimizerStats:
    """What the monitor asks of an optimizer: update norms and per-tensor state statistics.

    `before` runs in the step pre-hook, on the training thread, before the step changes anything.
    `hyperparameters` is read on the training thread right after the step (a scheduler may change
    the groups next); `after` runs right after it in the step post-hook, with those values. Both
    return device tensors only. `to_columns` turns the host copies into layer-table columns.
    """

    exact = True
    """Whether update norms are exact (False: estimated from a sample of elements)."""
    step_keeps_grads = True
    """Whether `optimizer.step()` leaves `p.grad` unchanged, so gradient statistics can wait until after it."""
    reads_grads_after = False
    """Whether `after` reads the gradients."""
    columns: tuple[str, ...] = ()

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state: Mapping[Tensor, Any] = optimizer.state
        """The optimizer's state as the statistics read it (keyed by, and holding, local shards when sharded)."""

    def before(self, bucket: Bucket, grads: list[Tensor], active: list[int] | None) -> Any:
        return None

    def hyperparameters(self) -> Any:
        return None

    def update_exact(self, bucket: Bucket) -> list[bool]:
        """Per parameter of `bucket`: whether its update norm is exact (else estimated from a sample)."""
        return [self.exact] * len(bucket.params)

    def step_values(self, hyper: Any) -> dict[str, float]:
        """Step-table columns of this optimizer, from `hyperparameters()` read right after the step."""
        return {}

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        """Statistics of `bucket` after the step."""
        raise NotImplementedError

    def to_columns(self, values: dict[str, np.ndarray], numels: np.ndarray) -> dict[str, np.ndarray]:
        return {k: values[k] for k in self.columns if k in values}


class AdamStats(OptimizerStats):
    """torch.optim.Adam and AdamW: exact update norms and state statistics.

    With `snapshot` (the parameters fit the monitor's temporary budget) the parameters are copied
    before the step and the update norm is that of the difference: three elementwise passes, against
    four passes and two temporaries for the closed form from `exp_avg`/`exp_avg_sq` and the step
    count, which larger models use so that they need no copy of the parameters. The copy is taken
    in `before`, right before the step, never carried over from the last step: the loop may have
    written into the weights since through `.data`, which no version counter sees.
    """

    columns = ("exp_avg_norm", "exp_avg_sq_mean", "exp_avg_sq_max", "eps_frac")

    def __init__(self, optimizer: torch.optim.Optimizer, *, snapshot: bool = False) -> None:
        super().__init__(optimizer)
        self.snapshot = snapshot
        self._copies: weakref.WeakKeyDictionary[Bucket, list[Tensor]] = weakref.WeakKeyDictionary()

    def before(self, bucket: Bucket, grads: list[Tensor], active: list[int] | None) -> Any:
        if not self.snapshot:
            return None
        copies = self._copies.get(bucket)
        if copies is None:
            copies = self._copies[bucket] = [torch.empty_like(p) for p in bucket.params]
        torch._foreach_copy_(copies, bucket.params)  # under no_grad: no detach needed
        return copies

    def hyperparameters(self) -> dict[int, tuple[float, float, float, float, float, bool]]:
        return {g: _adam_hyper(group, self.optimizer) for g, group in enumerate(self.optimizer.param_groups)}

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        copies, layers, active, hyper = step.snapshot, step.layers, step.active, step.hyper
        out: dict[str, Tensor] = {}
        if copies is not None:  # the copies from before the step: the change is their difference
            torch._foreach_sub_(copies, bucket.params)
            out["update_norm"] = norms(copies)
            if not layers:
                return out
        pos = active if active is not None else range(len(bucket.params))
        state = self.state
        live = [j for j in pos if "exp_avg" in state.get(bucket.params[j], ())]
        if not live:
            return out
        sub = None if active is None and len(live) == len(bucket.params) else live
        params = [bucket.params[j] for j in live]
        states = [state[p] for p in params]
        gi = [bucket.groups[j] for j in live]
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        lrs, beta1s, beta2s, epss, decays, amsgrads = (list(x) for x in zip(*(hyper[g] for g in gi)))
        got = adam_stats(
            params,
            m,
            [s["max_exp_avg_sq"] if ams else s["exp_avg_sq"] for s, ams in zip(states, amsgrads)],
            steps=_steps([s["step"] for s in states]),
            lrs=lrs,
            beta1s=beta1s,
            beta2s=beta2s,
            epss=epss,
            decays=decays,
            chunks=bucket.chunks_for(sub),
            count_eps=layers,
            update_norms=copies is None,
        )
        if copies is None:
            out["update_norm"] = bucket.expand(got["update_norm"], sub, 0.0)
        if layers:
            amsgrad = any(amsgrads)  # then the denominator is not exp_avg_sq
            out["above_eps"] = bucket.expand(got["above_eps"], sub, math.nan)
            out["exp_avg_norm"] = bucket.expand(norms(m), sub, math.nan)
            out["exp_avg_sq_sum"] = bucket.expand(sums(v) if amsgrad else got["denom_sq_sum"], sub, math.nan)
            sq_max = got.get("denom_sq_max") if not amsgrad else None
            out["exp_avg_sq_max"] = bucket.expand(maxes(v) if sq_max is None else sq_max, sub, math.nan)
        return out

    def to_columns(self, values: dict[str, np.ndarray], numels: np.ndarray) -> dict[str, np.ndarray]:
        if "above_eps" not in values:
            return {}
        return {
            "exp_avg_norm": values["exp_avg_norm"],
            "exp_avg_sq_mean": values["exp_avg_sq_sum"] / np.maximum(numels, 1),
            "exp_avg_sq_max": values["exp_avg_sq_max"],
            "eps_frac": 1.0 - values["above_eps"] / np.maximum(numels, 1),
        }


class SgdStats(OptimizerStats):
    """torch.optim.SGD: exact update norms from the gradients and `momentum_buffer`."""

    columns = ("momentum_norm",)
    reads_grads_after = True

    def hyperparameters(self) -> dict[int, tuple[float, float, float, bool, bool]]:
        return {g: _sgd_hyper(group) for g, group in enumerate(self.optimizer.param_groups)}

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        grads, active, hyper, layers = step.grads, step.active, step.hyper, step.layers
        pos = list(active if active is not None else range(len(bucket.params)))
        if not pos:
            return {}
        state = self.state
        params = [bucket.params[j] for j in pos]
        lrs, decays, momentums, nesterovs, maximizes = (list(x) for x in zip(*(hyper[bucket.groups[j]] for j in pos)))
        bufs = [state.get(p, {}).get("momentum_buffer") if mu != 0 else None for p, mu in zip(params, momentums)]
        update = sgd_update_norms(
            params,
            [grads[j] for j in pos],
            bufs,
            lrs=lrs,
            weight_decays=decays,
            momentums=momentums,
            nesterovs=nesterovs,
            maximizes=maximizes,
            chunks=bucket.chunks_for(active),
        )
        out = {"update_norm": bucket.expand(update, active, 0.0)}
        have = [k for k, b in enumerate(bufs) if b is not None]
        if layers and have:
            out["momentum_norm"] = bucket.expand(norms([bufs[k] for k in have]), [pos[k] for k in have], math.nan)
        return out


class SampledStats(OptimizerStats):
    """Any other optimizer: update norms from a bounded snapshot; norms of every state tensor."""

    exact = False
    step_keeps_grads = False  # an unknown step() may modify gradients in place

    def __init__(self, optimizer: torch.optim.Optimizer, *, budget: int) -> None:
        super().__init__(optimizer)
        self.budget = budget
        self._snapshots: dict[int, SampledSnapshot] = {}
        self._keys: dict[str, None] = {}

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"state_norm_{k}" for k in self._keys)

    def update_exact(self, bucket: Bucket) -> list[bool]:
        exact = set(self._snapshot(bucket).exact)
        return [j in exact for j in range(len(bucket.params))]

    def _snapshot(self, bucket: Bucket) -> SampledSnapshot:
        snap = self._snapshots.get(id(bucket))
        if snap is None:
            total = sum(int(n) for n in bucket.numels)
            share = max(1, round(self.budget * total / max(self._total(), 1)))  # budget split by size
            snap = self._snapshots[id(bucket)] = SampledSnapshot(bucket.params, budget=share, seed=len(self._snapshots))
        return snap

    def _total(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def before(self, bucket: Bucket, grads: list[Tensor], active: list[int] | None) -> Any:
        return self._snapshot(bucket).take(bucket.params)

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, step.snapshot)}
        if not step.layers:
            return out
        out.update(self.state_norms(bucket))
        return out

    def state_norms(self, bucket: Bucket) -> dict[str, Tensor]:
        """`state_norm_<key>`: the L2 norm of every floating state tensor of each parameter.

        Nested state is flattened: a list of tensors (SOAP's `Q`, one matrix per dimension) is one
        key whose norm is that of all its elements; a dict (heavyball keeps `{0: {...}}`) prefixes
        its keys (`0.exp_avg`).
        """
        flat = [_flat_state(self.state.get(p, {})) for p in bucket.params]
        out: dict[str, Tensor] = {}
        for key in dict.fromkeys(k for f in flat for k in f):
            self._keys[key] = None
            have = [j for j, f in enumerate(flat) if key in f]
            pieces = [t for j in have for t in flat[j][key]]
            owner = torch.tensor([n for n, j in enumerate(have) for _ in flat[j][key]], device=bucket.device)
            squares = norms(pieces).square()
            vec = torch.zeros(len(have), device=bucket.device).index_add_(0, owner, squares).sqrt()
            out[f"state_norm_{key}"] = bucket.expand(vec, None if len(have) == len(flat) else have, math.nan)
        return out


def _flat_state(state: Any, prefix: str = "") -> dict[str, list[Tensor]]:
    """Floating state tensors (at least 1-D) by key; lists of them under one key, dicts flattened."""
    out: dict[str, list[Tensor]] = {}
    items = state.items() if isinstance(state, dict) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            value = [value]
        if isinstance(value, dict):
            out.update(_flat_state(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            got = [t for t in value if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0]
            if got:
                out[name] = got
    return out
