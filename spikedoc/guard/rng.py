"""The process's random number generators (torch, CUDA, numpy, Python) as tensors and plain types.

Stored that way so a checkpoint holding them loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors, ints, floats and strings only.

    Example:
        >>> state = rng_state(); a = torch.rand(1); set_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
    }
    # Only when CUDA is in use: get_rng_state_all() would otherwise initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned; raises ValueError when it is malformed."""
    try:
        torch.set_rng_state(state["torch"])
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((str(n["kind"]), keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached"])))
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"checkpoint holds a malformed random-generator state ({exc!r})") from exc
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
