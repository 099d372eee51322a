"""What a checkpoint may hold: finite where the run needs it, and only what `weights_only` loads.

Two checks on a host copy of the state, both without reading anything back from disk:

- **finite**: parameters and optimizer state must be free of NaN and inf. A buffer is compared with
  its own state when the guard started: a causal mask of `-inf` (as
  `nn.Transformer.generate_square_subsequent_mask` builds it) is non-finite by design; a buffer
  whose non-finite entries differ from those it started with has been damaged.
- **loadable**: `torch.load(weights_only=True)` refuses any type outside a short list (plain
  containers and scalars, tensors, `torch.Size`/`dtype`/`device`, `torch.serialization`'s safe
  globals). The payload is walked for others before it is written. A numpy scalar (a `LambdaLR`
  returning `np.float64` leaves one in every param group's `lr`) is replaced by the Python number
  of the same value; anything else makes the payload one that could never load.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["nonfinite_pattern", "buffer_patterns", "nonfinite_entries", "make_loadable", "json_plain"]

#: Types the weights-only unpickler rebuilds (exact types: np.float64 subclasses float, torch.Size tuple).
_PLAIN = (dict, list, tuple, set, str, bytes, bytearray, int, float, bool, complex, type(None),
          collections.OrderedDict, collections.Counter, torch.Size, torch.device, torch.dtype)  # fmt: skip


def nonfinite_pattern(x: Tensor) -> Tensor:
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf (int8, same shape and device as `x`).

    Example:
        >>> nonfinite_pattern(torch.tensor([0.0, float("nan"), float("inf"), -float("inf")])).tolist()
        [0, 1, 2, 3]
    """
    return (torch.isnan(x).to(torch.int8) + 2 * torch.isposinf(x).to(torch.int8) + 3 * torch.isneginf(x).to(torch.int8))


def buffer_patterns(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's floating-point buffers that hold NaN or inf now, by state-dict key: their
    pattern (`nonfinite_pattern`, on the host), to compare a checkpoint's buffers with."""
    buffers = {id(b) for b in model.buffers()}
    patterns = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in buffers and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            patterns[key] = nonfinite_pattern(value.detach()).cpu()
    return patterns


def nonfinite_entries(state: dict[str, Any], allowed: dict[str, Tensor] | None = None) -> list[str]:
    """Names (`model.<key>`, `optimizer.state.<i>.<name>`) of the floating-point tensors in
    `state["model"]` and `state["optimizer"]` holding NaN or inf, except a model entry whose
    pattern equals its own in `allowed` (`buffer_patterns` at the start). One host sync per device.

    Example:
        >>> mask = torch.tensor([0.0, -float("inf")])
        >>> nonfinite_entries({"model": {"mask": mask}}, {"mask": nonfinite_pattern(mask)})
        []
    """
    allowed = allowed or {}
    names: list[str] = []
    flags: list[Tensor] = []

    def visit(x: Any, name: str, model_key: str | None) -> None:
        if isinstance(x, Tensor):
            if not (x.is_floating_point() or x.is_complex()):
                return
            expected = allowed.get(model_key) if model_key is not None else None
            if expected is not None and expected.shape == x.shape:  # non-finite by design: as it started
                flag = (nonfinite_pattern(x) == expected.to(x.device)).all()
            else:
                flag = torch.isfinite(x).all()
            names.append(name)
            flags.append(flag)
        elif isinstance(x, dict):
            for k, v in x.items():
                visit(v, f"{name}.{k}", None)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                visit(v, f"{name}.{i}", None)

    for key, value in (state.get("model") or {}).items():
        visit(value, f"model.{key}", key)
    visit(state.get("optimizer"), "optimizer", None)
    if not flags:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    bad = []
    for indices in by_device.values():
        ok = torch.stack([flags[i] for i in indices]).tolist()  # one host sync per device
        bad += [names[i] for i, good in zip(indices, ok) if not good]
    return sorted(bad, key=names.index)


def make_loadable(payload: Any, name: str = "") -> tuple[Any, list[str], list[str]]:
    """`payload` with numpy scalars replaced by Python numbers, the entries so replaced, and the
    entries no `torch.load(weights_only=True)` could rebuild (named `a.b.c`, with their type).

    Example:
        >>> import numpy as np
        >>> make_loadable({"lr": np.float64(0.5), "f": print})
        ({'lr': 0.5, 'f': <built-in function print>}, ['lr'], ['f (builtin_function_or_method)'])
    """
    coerced: list[str] = []
    refused: list[str] = []
    safe = tuple(g for g in torch.serialization.get_safe_globals() if isinstance(g, type))

    def walk(x: Any, where: str) -> Any:
        if isinstance(x, Tensor) or type(x) in (int, float, bool, str, type(None)):
            return x  # the common cases first
        if type(x) in (dict, collections.OrderedDict):
            return type(x)((k, walk(v, f"{where}.{k}" if where else str(k))) for k, v in x.items())
        if type(x) in (list, tuple):
            return type(x)(walk(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(x))
        if _numpy_scalar(x):
            coerced.append(where)
            return x.item()
        if type(x) not in _PLAIN and not isinstance(x, safe):
            refused.append(f"{where} ({type(x).__name__})")
        return x

    return walk(payload, name), coerced, refused


def json_plain(value: Any) -> Any:
    """An event's detail as strict JSON: non-finite floats become None (NaN) or "inf"/"-inf".

    Example:
        >>> json_plain({"loss": float("nan"), "z": [float("inf"), 1.0]})
        {'loss': None, 'z': ['inf', 1.0]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    return value


def _numpy_scalar(x: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return False
    return isinstance(x, np.generic) and x.dtype.kind in "biuf"
