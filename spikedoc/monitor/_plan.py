"""Plan: what `watch` works out once about the watched parameters (again when param groups change)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from spikedoc.monitor._optim import Bucket

__all__ = ["Plan"]


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
