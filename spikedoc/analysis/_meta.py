"""Tolerant readers of meta.json: every key is optional and two layouts are accepted.

The monitor writes `parameters` (with `module`), `optimizer.groups` and `watch`; the layout first
specified for the format nests `model.parameters` (with `module_type`), `optimizer.param_groups`
and `config`. Runs from other tools have no meta at all.
"""

from __future__ import annotations

from typing import Any

__all__ = ["parameter_modules", "param_groups", "watch_config", "optimizer_name"]


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
