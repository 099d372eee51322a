"""The run directory: its format, the background writer, the reader and importers from other tools.

`RunWriter` is imported eagerly (pyarrow and numpy only, for the monitor); the reader and the
importers, which need pandas, are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spikedoc.store._files import write_whole
from spikedoc.store.writer import RunWriter

__all__ = ["Run", "RunWriter", "load", "read_csv", "read_tensorboard", "write_whole"]

_LAZY = {
    "load": "spikedoc.store.reader",
    "Run": "spikedoc.store.reader",
    "read_csv": "spikedoc.store.importers",
    "read_tensorboard": "spikedoc.store.importers",
}

if TYPE_CHECKING:
    from spikedoc.store.importers import read_csv, read_tensorboard
    from spikedoc.store.reader import Run, load


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spikedoc.store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
