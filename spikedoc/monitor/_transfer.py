"""One device-to-host copy per device and step, read back later without stalling the device."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

__all__ = ["Packer", "Landing"]


def _wire_dtype(device: torch.device) -> torch.dtype:
    # float64 carries float32 statistics, counts below 2**53 and 32-bit hash halves exactly; MPS has
    # no float64, where the hash halves lose their low bits (documented limitation).
    return torch.float32 if device.type == "mps" else torch.float64


class Landing:
    """The host side of one `Packer.launch()`: named numpy arrays once the copies have landed."""

    def __init__(self, copies: list[tuple[Tensor, object | None, list[tuple[str, int, int, tuple[int, ...]]]]]) -> None:
        self._copies = copies
        self._values: dict[str, np.ndarray] | None = None

    def values(self) -> dict[str, np.ndarray]:
        """Wait for the copies (normally long finished) and return `{key: float64 array}`."""
        if self._values is None:
            out: dict[str, np.ndarray] = {}
            for host, event, layout in self._copies:
                if event is not None:
                    event.synchronize()  # type: ignore[attr-defined]
                flat = host.numpy()
                for key, start, stop, shape in layout:
                    out[key] = flat[start:stop].reshape(shape)
            self._values, self._copies = out, []
        return self._values


class Packer:
    """Collects the small result tensors of one step and moves them to the host in one copy per device.

    Example:
        >>> packer = Packer()
        >>> packer.add("norms", torch.tensor([1.0, 2.0]))
        >>> packer.add("count", torch.tensor(3))
        >>> landing = packer.launch()
        >>> landing.values()["norms"].tolist(), landing.values()["count"].item()
        ([1.0, 2.0], 3.0)
    """

    def __init__(self) -> None:
        self._parts: dict[torch.device, list[tuple[str, Tensor]]] = defaultdict(list)

    def add(self, key: str, tensor: Tensor) -> None:
        """Queue a tensor (any shape, real dtype) under a unique key."""
        self._parts[tensor.device].append((key, tensor.detach()))

    def launch(self) -> Landing:
        """Concatenate per device and start the copies; returns at once (non-blocking on CUDA)."""
        copies = []
        for device, parts in self._parts.items():
            layout, flat_parts, offset = [], [], 0
            for key, t in parts:
                layout.append((key, offset, offset + t.numel(), tuple(t.shape)))
                flat_parts.append(t.reshape(-1))
                offset += t.numel()
            flat = torch.empty(offset, dtype=_wire_dtype(device), device=device)
            torch.cat(flat_parts, out=flat)  # converts every part to the wire dtype in the same kernel
            event = None
            if device.type == "cpu":
                host = flat
            elif device.type == "cuda":
                host = torch.empty(offset, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:  # other accelerators: a plain (synchronising) copy
                host = flat.to("cpu")
            copies.append((host, event, layout))
        self._parts = defaultdict(list)
        return Landing(copies)
