"""Tolerant readers of meta.json: every key is optional and two layouts are accepted.

The monitor writes `parameters` (with `module`), `optimizer.groups` and `watch`; the layout first
specified for the format nests `model.parameters` (with `module_type`), `optimizer.param_groups`
and `config`. Runs from other tools have no meta at all.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["parameter_modules", "param_groups", "watch_config", "optimizer_name", "group_optimizer", "gradient_weight_decay",
           "second_moment_decay"]


def parameter_modules(meta: dict[str, Any]) -> dict[str, str | None]:
    """Parameter name -> class name of the module that owns it (None when unknown)."""
    params = meta.get("parameters")
    if not isinstance(params, list):
        params = (meta.get("model") or {}).get("parameters") if isinstance(meta.get("model"), dict) else None
    out: dict[str, str | None] = {}
    for p in params or []:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            module = p.get("module_type", p.get("module"))
            out[p["name"]] = module if isinstance(module, str) else None
    return out


def param_groups(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The optimizer's param groups (dicts with `weight_decay`, `betas`, `params`, ...)."""
    optimizer = meta.get("optimizer")
    if not isinstance(optimizer, dict):
        return []
    groups = optimizer.get("groups", optimizer.get("param_groups"))
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []


def watch_config(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The monitor's settings (`clip`, `layer_every`, ...), or None when the run has none."""
    for key in ("watch", "config"):
        if isinstance(meta.get(key), dict):
            return meta[key]
    return None


def optimizer_name(meta: dict[str, Any]) -> str:
    """Class name of the optimizer without its module path (`torch.optim.adamw.AdamW` -> `AdamW`)."""
    optimizer = meta.get("optimizer")
    name = optimizer.get("class") if isinstance(optimizer, dict) else None
    return str(name or "").rsplit(".", 1)[-1]


def group_optimizer(meta: dict[str, Any], group: dict[str, Any]) -> str:
    """Class name of the optimizer stepping `group` (several optimizers: each group names its own)."""
    own = group.get("optimizer_class")
    return str(own).rsplit(".", 1)[-1] if isinstance(own, str) else optimizer_name(meta)


#: Optimizers whose first moment is a running average of the gradient (Adam's and Lion's `lerp`) or a
#: decayed sum of it (SGD's momentum buffer), and whether their weight decay is coupled into that
#: gradient (`weight_decay * p` added to it) or decoupled (applied to the weights directly).
_FIRST_MOMENT_DECAY = {"Adam": "coupled", "NAdam": "coupled", "RAdam": "coupled", "SGD": "coupled",
                       "AdamW": "decoupled", "Lion": "decoupled"}  # fmt: skip


def gradient_weight_decay(meta: dict[str, Any]) -> dict[str, float]:
    """Parameter name -> the weight decay its optimizer adds to the gradient its first moment averages
    (0 where decoupled: AdamW, Lion, `decoupled_weight_decay=True`), for the optimizers in
    `_FIRST_MOMENT_DECAY` only: another optimizer's moment may follow another rule.

    Example:
        >>> gradient_weight_decay({"optimizer": {"class": "torch.optim.adam.Adam",
        ...                                      "groups": [{"weight_decay": 0.1, "params": ["w"]}]}})
        {'w': 0.1}
    """
    out: dict[str, float] = {}
    for group in param_groups(meta):
        name = group_optimizer(meta, group)
        try:
            decay = float(group.get("weight_decay") or 0.0)
        except (TypeError, ValueError):
            continue
        if name not in _FIRST_MOMENT_DECAY or not math.isfinite(decay):
            continue
        decoupled = _FIRST_MOMENT_DECAY[name] == "decoupled" or group.get("decoupled_weight_decay") is True
        for param in group.get("params") or []:
            if isinstance(param, str):
                out[param] = 0.0 if decoupled else decay
    return out


#: Optimizers whose `exp_avg_sq` is Adam's: v = beta2 v + (1 - beta2) g^2, so v >= beta2 v_before elementwise.
_ADAM_SECOND_MOMENT = ("Adam", "AdamW", "NAdam", "RAdam")
#: The smallest beta2 assumed where a group does not record its betas: 0.9, the lowest in common use.
_BETA2_FLOOR = 0.9


def second_moment_decay(meta: dict[str, Any]) -> dict[str, float]:
    """Parameter name -> the least factor one update can shrink its `exp_avg_sq` by (its group's
    beta2, at most `_BETA2_FLOOR`), for Adam's family only: another optimizer's second moment may
    follow another rule.

    Example:
        >>> second_moment_decay({"optimizer": {"class": "torch.optim.adamw.AdamW",
        ...                                    "groups": [{"betas": [0.9, 0.95], "params": ["w"]}]}})
        {'w': 0.9}
    """
    out: dict[str, float] = {}
    for group in param_groups(meta):
        if group_optimizer(meta, group) not in _ADAM_SECOND_MOMENT:
            continue
        betas = group.get("betas")
        try:
            beta2 = float(betas[1]) if isinstance(betas, (list, tuple)) and len(betas) == 2 else _BETA2_FLOOR
        except (TypeError, ValueError):
            beta2 = _BETA2_FLOOR
        if not 0 < beta2 < 1:
            continue
        for param in group.get("params") or []:
            if isinstance(param, str):
                out[param] = min(beta2, _BETA2_FLOOR)
    return out
