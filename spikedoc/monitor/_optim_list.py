"""Several optimizers stepping one model (Muon for matrices, AdamW for the rest) seen as one optimizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spikedoc.monitor._optim import AfterStep, Bucket, OptimizerStats

__all__ = ["OptimizerList", "JointStats"]


class _JointState(Mapping):
    """`state` of several optimizers as one read-only mapping (a parameter belongs to one of them)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, p: Tensor) -> Any:
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        raise KeyError(p)

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class OptimizerList:
    """The optimizers of one training step, in the order given, as the monitor reads one optimizer.

    `param_groups` is every optimizer's groups in turn (the same dict objects, so a scheduler's
    change is seen): group `g` of the run is the `g`-th of that list, and the step table's `lr_<g>`
    is its LR. `owner(g)` says which optimizer group `g` belongs to and its index there.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
        >>> opts = OptimizerList([torch.optim.SGD([a], lr=0.1), torch.optim.AdamW([b], lr=1e-3)])
        >>> [g["lr"] for g in opts.param_groups], opts.owner(1)
        ([0.1, 0.001], (1, 0))
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.state = _JointState(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def owner(self, g: int) -> tuple[int, int]:
        """(optimizer index, group index within it) of the run's group `g`."""
        for k, opt in enumerate(self.optimizers):
            if g < len(opt.param_groups):
                return k, g
            g -= len(opt.param_groups)
        raise IndexError(f"no param group {g}")


class JointStats(OptimizerStats):
    """Each bucket's statistics from the statistics of the optimizer that owns it (`Bucket.owner`)."""

    def __init__(self, parts: Sequence[OptimizerStats]) -> None:
        self.parts = list(parts)
        self.exact = all(p.exact for p in self.parts)
        self.step_keeps_grads = all(p.step_keeps_grads for p in self.parts)
        self.reads_grads_after = any(p.reads_grads_after for p in self.parts)

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(c for p in self.parts for c in p.columns))

    def update_exact(self, bucket: Bucket) -> list[bool]:
        return self.parts[bucket.owner].update_exact(bucket)

    def before(self, bucket: Bucket, grads: list[Tensor], active: list[int] | None) -> Any:
        return self.parts[bucket.owner].before(bucket, grads, active)

    def hyperparameters(self) -> list[Any]:
        return [p.hyperparameters() for p in self.parts]

    def step_values(self, hyper: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, part in enumerate(self.parts):
            for key, value in part.step_values(hyper[k] if hyper is not None else None).items():
                out[key if key not in out else f"{key}_{k}"] = value
        return out

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        hyper = step.hyper[bucket.owner] if step.hyper is not None else None
        return self.parts[bucket.owner].after(bucket, replace(step, hyper=hyper))

    def to_columns(self, values: dict[str, np.ndarray], numels: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for part in self.parts:
            for key, vec in part.to_columns(values, numels).items():
                # Two parts writing one column (two Adams) fill each other's NaN (unowned) entries.
                out[key] = vec if key not in out else np.where(np.isnan(out[key]), vec, out[key])
        return out
