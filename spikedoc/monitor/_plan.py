"""Plan: what `watch` works out once about the watched parameters (again when param groups change)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spikedoc.monitor import meta as _meta
from spikedoc.monitor._optim import Bucket
from spikedoc.monitor._optim_list import JointStats
from spikedoc.monitor._optim_state import for_optimizer
from spikedoc.monitor.distributed import LocalState, is_sharded, local
from spikedoc.monitor.statistics import Chunks

__all__ = ["Plan", "build_plan"]

#: Elementwise temporaries per batch: 1% of the parameters, but at least 2**22 elements (16 MB in
#: fp32), so models up to ~400M parameters take one batch and larger ones stay within 1%.
_TEMP_SHARE, _TEMP_MIN = 0.01, 1 << 22
#: Models of at most this many parameter elements (the temporary floor: 16 MB in fp32) are copied
#: before each step, and Adam's update norm is the norm of the difference (three passes); larger
#: models use the closed form from the optimizer state and need no copy.
_SNAPSHOT_MAX = _TEMP_MIN
#: Elements the sampled update estimate keeps: 1% of the parameters, at least 2**16 (256 KB fp32).
_SAMPLE_SHARE, _SAMPLE_MIN = 0.01, 1 << 16


@dataclass
class Plan:
    """The parameters in optimizer order and how their statistics are batched.

    The monitor's hooks, its statistics jobs and its row assembly all read this one object; a
    change of the optimizers' param groups builds a new one (after the old one's work is done).
    """

    params: list[Tensor]
    """Every parameter of every optimizer, in optimizer and group order (the layer rows' order)."""
    param_ids: set[int]
    names: list[str]
    """Qualified name of each parameter (`model.named_parameters()`), in the same order."""
    numels: np.ndarray
    """Elements of each full tensor (float64), for element-weighted means."""
    sharded: bool
    """Some parameters are sharded (FSDP2) over more than one rank: statistics combine over ranks."""
    buckets: list[Bucket]
    """Parameters grouped by (optimizer, device, dtype): one batched kernel per statistic each."""
    shard_masks: list[np.ndarray]
    """Per bucket, which of its parameters are sharded."""
    placeholders: list[Tensor]
    """Per bucket, a one-element stand-in for a missing gradient."""
    stats: Any
    """The optimizer statistics (`OptimizerStats`, or `JointStats` over several optimizers)."""
    state: Mapping
    """The optimizers' state, one read-only mapping (through the local shards when sharded)."""

    def update_exact(self) -> list[bool]:
        """Per parameter: whether its update norm is exact, else estimated from a sample."""
        exact = [True] * len(self.params)
        for bucket in self.buckets:
            for i, flag in zip(bucket.index, self.stats.update_exact(bucket)):
                exact[i] = bool(flag)
        return exact


def build_plan(model: nn.Module, optimizers: list[torch.optim.Optimizer], optimizer: Any, *, world: int,
               clip: float | None) -> Plan:
    """Work out the plan of `optimizers`' parameters (`optimizer`: them read as one) on `world` ranks."""
    params, groups, owners = [], [], []
    for k, opt in enumerate(optimizers):
        for g, group in enumerate(opt.param_groups):  # g: the group's index within its optimizer
            params += group["params"]
            groups += [g] * len(group["params"])
            owners += [k] * len(group["params"])
    numels = np.array([p.numel() for p in params], dtype=np.float64)  # of the full tensors
    # Statistics read local shards (FSDP2's DTensors); the rows combine them over ranks (_consume).
    shards = [local(p) for p in params]
    sharded = [is_sharded(p) for p in params]
    any_sharded = any(sharded) and world > 1
    if any_sharded and clip is not None:
        raise ValueError("watch: clip= does not support sharded (FSDP2) parameters; clip in the loop with "
                         "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), which is observed")
    total = int(sum(t.numel() for t in shards))
    budget = max(int(total * _TEMP_SHARE), _TEMP_MIN)
    by_key: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(shards):
        by_key.setdefault((owners[i], t.device, t.dtype), []).append(i)
    buckets = [
        Bucket(device=dev, dtype=dt, index=ix, params=[shards[i] for i in ix], sources=[params[i] for i in ix],
               groups=[groups[i] for i in ix], chunks=Chunks([shards[i].numel() for i in ix], budget),
               numels=np.array([shards[i].numel() for i in ix], dtype=np.float64), owner=k,
               in_order=ix == list(range(len(params))), distributed=any(shards[i] is not params[i] for i in ix))
        for (k, dev, dt), ix in by_key.items()
    ]  # fmt: skip
    sample_budget = max(int(total * _SAMPLE_SHARE), _SAMPLE_MIN)
    owned = np.bincount(owners, weights=numels, minlength=len(optimizers)) if params else [0.0]
    parts = [  # several optimizers share the sample budget by their parameter counts
        for_optimizer(opt, sample_budget=max(1, round(sample_budget * float(owned[k]) / max(total, 1))),
                      snapshot=total <= _SNAPSHOT_MAX)
        for k, opt in enumerate(optimizers)
    ]  # fmt: skip
    # Statistics read the optimizers' state through their local shards when sharded.
    owners_of = {id(t): p for t, p in zip(shards, params)}
    for part in parts:
        part.state = LocalState(part.optimizer.state, owners_of) if any_sharded else part.optimizer.state
    states = optimizer.state  # one read-only mapping over several optimizers (never inserts)
    plan = Plan(
        params=params, param_ids={id(p) for p in params}, names=_meta.parameter_names(model, params),
        numels=numels, sharded=any_sharded, buckets=buckets,
        shard_masks=[np.array([sharded[i] for i in b.index], dtype=bool) for b in buckets],
        placeholders=[torch.zeros(1, dtype=b.dtype, device=b.device) for b in buckets],
        stats=parts[0] if len(parts) == 1 else JointStats(parts),
        state=LocalState(states, owners_of) if any_sharded else states,
    )  # fmt: skip
    return plan
