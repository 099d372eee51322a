"""The job a checkpoint belongs to: a fingerprint of the run's configuration, to resume only its own.

Taken when the guard is built, before any step: the model's parameters (names, shapes, dtypes, as
one hash and a count), the optimizer's class and each param group's hyperparameters (the LR as the
schedule started it: `initial_lr` when a scheduler set one), the scheduler's class. A process that
restarts the same job after a crash builds the same objects and gets the same fingerprint; a new
experiment in the same run directory (another LR, another model size) does not.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["job_fingerprint", "differences"]


def job_fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> dict[str, Any]:
    """The run's configuration as plain types (stored in every checkpoint, compared on resume).

    Example:
        >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> job_fingerprint(model, opt)["hyperparameters"][0]["lr"]
        0.1
    """
    shapes = "\n".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in model.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        hyper = {k: _plain(v) for k, v in group.items() if k not in ("params", "initial_lr")}
        if "initial_lr" in group:  # the LR the schedule starts from, whatever step it is at
            hyper["lr"] = _plain(group["initial_lr"])
        groups.append(dict(sorted(hyper.items())))
    return {
        "parameters": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "parameter_tensors": sum(1 for _ in model.parameters()),
        "optimizer": type(optimizer).__qualname__,
        "hyperparameters": groups,
        "scheduler": type(scheduler).__qualname__ if scheduler is not None else None,
    }


def differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprint and this run's, in words (empty: the same job).

    Example:
        >>> a = {"optimizer": "AdamW", "hyperparameters": [{"lr": 0.001}]}
        >>> differences(a, {"optimizer": "AdamW", "hyperparameters": [{"lr": 0.003}]})
        ['lr of param group 0: 0.001 -> 0.003']
    """
    if not isinstance(saved, dict):
        return ["the checkpoint records no job fingerprint (written by another version or program)"]
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key), now.get(key)
        if key == "hyperparameters" and isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new)):
                out += [f"{k} of param group {i}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k)]  # fmt: skip
        elif key == "parameters" and old != new:
            out.append("the model's parameter names or shapes")
        elif old != new:
            out.append(f"{key.replace('_', ' ')}: {old!r} -> {new!r}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")  # the same LR read back from a checkpoint, to the last bits
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value) if type(value).__repr__ is not object.__repr__ else type(value).__qualname__
