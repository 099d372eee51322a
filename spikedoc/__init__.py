"""spikedoc: a training-run stability monitor and loss-spike doctor for PyTorch.

    monitor = spikedoc.watch(model, optimizer, run_dir="runs/exp1")   # record a run
    run = spikedoc.load("runs/exp1")                                  # read it back (pandas)
    diagnosis = spikedoc.analyze("runs/exp1")                         # find and explain spikes
    spikedoc.columns()                                                # what each step column means
    guard = spikedoc.Guard(model, optimizer, data=loader, run_dir="runs/exp1")  # a run that heals itself

Names are imported lazily so that analysing a run never imports torch and recording one never
imports pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spikedoc._version import __version__
from spikedoc.errors import (
    GuardStopped,
    RunFormatError,
    RunNotFoundError,
    RunTooLargeError,
    SpikedocError,
    UnsupportedVersionError,
)

__all__ = [
    "watch",
    "Monitor",
    "load",
    "Run",
    "columns",
    "analyze",
    "Diagnosis",
    "Incident",
    "Guard",
    "GuardStopped",
    "SpikedocError",
    "RunNotFoundError",
    "RunFormatError",
    "RunTooLargeError",
    "UnsupportedVersionError",
    "__version__",
]

_LAZY = {
    "watch": "spikedoc.monitor",
    "Monitor": "spikedoc.monitor",
    "load": "spikedoc.store.reader",
    "Run": "spikedoc.store.reader",
    "columns": "spikedoc.store.schema",
    "analyze": "spikedoc.analysis",
    "Diagnosis": "spikedoc.analysis",
    "Incident": "spikedoc.analysis.incident",
    "Guard": "spikedoc.guard",
}

if TYPE_CHECKING:
    from spikedoc.analysis import Diagnosis, analyze
    from spikedoc.analysis.incident import Incident
    from spikedoc.guard import Guard
    from spikedoc.monitor import Monitor, watch
    from spikedoc.store.reader import Run, load
    from spikedoc.store.schema import columns


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spikedoc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
