"""What `meta.json` says about a watched run: versions, model parameters, optimizer groups, config."""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from spikedoc._version import __version__

__all__ = ["unwrap", "parameter_names", "describe", "describe_scheduler", "distributed_rank"]

# Wrapper segments added by torch.compile, FSDP1 and activation checkpointing; never user names.
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside `torch.compile` and DDP/DataParallel wrappers."""
    for _ in range(8):  # wrappers nest (compile(DDP(model))), but never deeply
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def _clean(name: str) -> str:
    return _WRAPPER_SEGMENT.sub(lambda m: m.group(1), name).lstrip(".")


def parameter_names(model: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """Names of `params` as `named_parameters()` of the unwrapped model gives them.

    Wrapper prefixes (`_orig_mod.`, DDP's `module.`, FSDP/checkpoint wrappers) are removed, so
    names stay the same whether or not the model was compiled or wrapped. A parameter the model
    does not own (only the optimizer has it) is named `param_<i>`.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> parameter_names(torch.compile(m), list(m.parameters()))
        ['weight', 'bias']
    """
    by_id = {id(p): _clean(n) for n, p in unwrap(model).named_parameters()}
    return [by_id.get(id(p), f"param_{i}") for i, p in enumerate(params)]


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def describe(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    names: Sequence[str],
    *,
    watch: dict[str, Any],
    start_step: int,
    update_exact: Sequence[bool] | None = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """The run metadata `watch` writes to `meta.json`.

    Args:
        model: The watched model (wrappers are looked through).
        optimizers: The watched optimizer(s), in the order given to `watch`.
        names: Parameter names in optimizer order (from `parameter_names`).
        watch: The monitor's configuration.
        start_step: Index of the first step this segment records.
        update_exact: Per parameter, whether its update norm is exact (else estimated).
        scheduler: `describe_scheduler` of the scheduler(s), if given.
    """
    inner = unwrap(model)
    modules = {_clean(n): type(m).__name__ for n, m in inner.named_modules()}
    rank, world_size = distributed_rank()
    params, groups, decayed = [], [], []
    k = 0
    owned = [(o, opt, group) for o, opt in enumerate(optimizers) for group in opt.param_groups]
    for g, (o, opt, group) in enumerate(owned):
        group_names = list(names[k : k + len(group["params"])])
        for name, p in zip(group_names, group["params"]):
            params.append({
                "name": name,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "numel": p.numel(),
                "module": modules.get(name.rpartition(".")[0], type(inner).__name__ if "." not in name else None),
                "group": g,
                "optimizer": o,
                "requires_grad": p.requires_grad,
                "update_norm": "exact" if update_exact is None or update_exact[len(params)] else "estimated",
            })  # fmt: skip
        hyper = {key: _jsonable(v) for key, v in group.items() if key != "params"}
        groups.append({**hyper, "params": group_names, "optimizer": o, "optimizer_class": _class_name(opt)})
        if float(_jsonable(group.get("weight_decay", 0.0)) or 0.0) != 0.0:
            decayed += group_names
        k += len(group["params"])
    return {
        "spikedoc_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "start_time": time.time(),
        "start_step": start_step,
        "rank": rank,
        "world_size": world_size,
        "model": {
            "class": type(inner).__qualname__,
            "num_parameters": sum(p["numel"] for p in params),
            "devices": sorted({str(p.device) for _, _, g in owned for p in g["params"]}),
        },
        "parameters": params,
        "optimizer": {
            # Several optimizers: "class" is the first one's; "optimizers" lists each with its groups.
            "class": _class_name(optimizers[0]),
            "groups": groups,
            "weight_decay_params": decayed,
            "optimizers": [{"class": _class_name(opt), "groups": [g for g, (o, _, _) in enumerate(owned) if o == k]}
                           for k, opt in enumerate(optimizers)],
        },
        "scheduler": scheduler,
        "watch": watch,
    }


def describe_scheduler(scheduler: Any) -> list[dict[str, Any]] | None:
    """Class and settings of LR scheduler(s) for `meta.json` (None when none was given).

    The settings are the scheduler's `state_dict()` without its bookkeeping (`_last_lr`,
    `_get_lr_called_within_step`, ...): `T_0`, `T_mult`, `eta_min`, `last_epoch`, `base_lrs` for
    `CosineAnnealingWarmRestarts`, the milestones and inner schedulers of `SequentialLR`.
    Functions (LambdaLR's lambdas) are recorded by their repr.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10)
        >>> info = describe_scheduler(sched)[0]
        >>> info["class"], info["settings"]["T_0"], info["settings"]["last_epoch"]
        ('CosineAnnealingWarmRestarts', 10, 0)
    """
    if scheduler is None:
        return None
    out = []
    for sched in scheduler if isinstance(scheduler, (list, tuple)) else [scheduler]:
        try:
            state = sched.state_dict()
        except Exception:  # noqa: BLE001 - a scheduler without a state dict is still named
            state = {}
        settings = {k: _jsonable(v) for k, v in state.items() if not k.startswith("_") or k in ("_milestones", "_schedulers")}
        inner = getattr(sched, "_schedulers", None)
        if isinstance(inner, (list, tuple)):  # SequentialLR, ChainedScheduler
            settings["schedulers"] = describe_scheduler(list(inner))
            settings.pop("_schedulers", None)
        out.append({"class": type(sched).__name__, "module": type(sched).__module__, "settings": settings})
    return out
