"""SecondMoments: the optimizer's second-moment estimates caught collapsing, before the update they would blow up.

Adam's `exp_avg_sq` is a running average of squared gradients: one update multiplies it by beta2
and adds a non-negative term, so no element falls below beta2 times its value before, and neither
does the tensor's norm of it. The same holds for RMSprop's `square_avg` (alpha), Adadelta's
(rho) and Adamax's `exp_inf` (a max with beta2 times itself). A norm below that bound has no cause
inside the optimizer: the state was overwritten (a lossy checkpoint converter, a loop's bug), and
the next update divides by a near-zero second moment. On the test loops a zeroed `exp_avg_sq`
made the update 5000 times its usual size while the loss was still in band (z 4, under the
detector's 7), so the guard checks the bound itself rather than waiting for the loss.

The check is exact up to rounding (`MARGIN`), needs no baseline to learn and no threshold fitted
to runs: it reads each tensor's second moment once per judged step (one fused norm over them all,
on the device) and adds one number, the count of tensors below their bound, to the step's one
host sync.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from spikedoc.monitor.statistics import norms

__all__ = ["SecondMoments", "MARGIN", "decay_of", "second_moments"]

#: Relative rounding allowance under the bound, at least: a norm accumulated in float32 over many
#: elements, or a state kept in a low-precision dtype (then 4 of its epsilons, e.g. 3% for
#: bfloat16), may land a little under beta2 times the last one with nothing wrong. On clean runs the
#: smallest ratio to the bound seen was 1.0000 (calibration in docs/guard.md).
MARGIN = 1e-3


def decay_of(key: str, group: dict[str, Any]) -> float | None:
    """The factor one update can at most shrink state `key` by, from its param group's
    hyperparameters; None when `key` is no running second moment this module knows, or the factor
    is not a plain number in [0, 1]."""
    if key in ("exp_avg_sq", "exp_inf"):
        betas = group.get("betas")
        value = betas[1] if isinstance(betas, (tuple, list)) and len(betas) > 1 else None
    elif key == "square_avg":
        value = group.get("alpha", group.get("rho"))
    else:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and value.device.type == "cpu":
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None
    return float(value)


_KEYS = ("exp_avg_sq", "exp_inf", "square_avg")


class _Snapshot(NamedTuple):
    which: tuple[tuple[int, str], ...]
    """(parameter id, state key) of each tensor measured."""
    norms: Tensor
    decays: list[float]
    decays_on_device: Tensor
    calls: int
    """`SecondMoments.calls` when measured."""


class SecondMoments:
    """Per judged step: how many second-moment tensors fell below their bound since the last accepted step.

    `measure` (before the update, inside `optimizer.step()`) returns that count as a device scalar
    for the step's one sync; `accept` makes the measured state the next step's baseline (not after a
    collapse: the broken state is never the baseline); `reset` forgets the baseline (the guard
    restored a state). `calls` counts the optimizer's `step()` calls, each at most one update.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.Adam([p]); p.grad = torch.ones(3)
        >>> moments = SecondMoments(); opt.step(); moments.calls += 1
        >>> moments.measure(opt) is None; moments.accept()
        True
        >>> _ = opt.state[p]["exp_avg_sq"].zero_(); moments.calls += 1
        >>> int(moments.measure(opt))
        1
    """

    def __init__(self) -> None:
        self.calls = 0
        self._base: _Snapshot | None = None
        self._measured: _Snapshot | None = None

    def measure(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """The count of tensors whose second moment's norm is under `decay ** updates` times the
        baseline's (a float32 device scalar), or None: no baseline to compare with, or nothing to check."""
        found = second_moments(optimizer)
        if found is None:
            self._measured = None
            return None
        which, tensors, decays = found
        current = norms(tensors)  # (n,) float32, one fused pass over the state
        base = self._base
        same = base is not None and base.which == which and base.norms.device == current.device
        on_device = base.decays_on_device if same and base.decays == decays else \
            torch.tensor(decays, dtype=torch.float32).to(current.device, non_blocking=True)  # fmt: skip
        self._measured = _Snapshot(which, current, decays, on_device, self.calls)
        if not same:  # another set of tensors (state created or dropped): nothing to compare with
            return None
        return _below_bound(self._measured, base).sum(dtype=torch.float32)

    def accept(self) -> None:
        """The state measured last is sound: the next step is compared with it."""
        if self._measured is not None:
            self._base = self._measured
        self._measured = None

    def reset(self) -> None:
        """Forget the baseline (the state was put back from a checkpoint, or replaced)."""
        self._base = self._measured = None

    def collapsed(self, names: dict[int, str]) -> dict[str, Any]:
        """The tensors under their bound at the last measure and their ratio to the baseline (one
        host sync: read only on a step that collapsed). `names` maps a parameter's id to its name."""
        base, now = self._base, self._measured
        if base is None or now is None or base.which != now.which:
            return {}
        ratios = (now.norms / base.norms.clamp_min(torch.finfo(torch.float32).tiny)).tolist()
        below = _below_bound(now, base).tolist()  # the veto's own test, read on the host
        k = max(0, now.calls - base.calls)
        hit = [(f"{names.get(pid, '?')}.{key}", r) for (pid, key), r, b in zip(now.which, ratios, below) if b]
        return {"tensors": [name for name, _ in hit[:32]], "collapsed": len(hit), "of": len(now.which),
                "ratio_min": min((r for _, r in hit), default=math.nan),
                "bound": max((d**k for d in now.decays), default=math.nan)}  # fmt: skip


def _below_bound(now: _Snapshot, base: _Snapshot) -> Tensor:
    """Which second moments fell below what the updates since `base` allow (decay ** updates times
    their norm then), among those that had a norm: a bool vector on the device."""
    bound = now.decays_on_device.pow(max(0, now.calls - base.calls)) * base.norms
    return (now.norms < bound) & (base.norms > 0)


def second_moments(optimizer: torch.optim.Optimizer) -> tuple[tuple[tuple[int, str], ...], list[Tensor], list[float]] | None:
    """Each running second moment in the optimizer's state, and the smallest factor of its norm
    one update allows (its decay, less the rounding allowance of its dtype)."""
    which, tensors, decays = [], [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in _KEYS:
                v = state.get(key)
                decay = decay_of(key, group) if isinstance(v, Tensor) and v.is_floating_point() and v.numel() else None
                if decay is not None:
                    local = v.to_local() if hasattr(v, "to_local") else v  # an FSDP2 shard: its own elements
                    which.append((id(p), key))
                    tensors.append(local)
                    decays.append(decay * (1.0 - max(MARGIN, 4 * torch.finfo(local.dtype).eps)))
    return (tuple(which), tensors, decays) if tensors else None
