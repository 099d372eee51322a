"""Analysis: detect incidents in a recorded run, attribute them, diagnose the cause, lint the setup.

Pure data in (pandas), findings out; this package never imports torch. Its names load on first
use, so `spikedoc.analysis.streaming` (the online detector) and `spikedoc.analysis.recovery` can be
imported by the monitor and the guard without pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spikedoc.analysis.config import AnalysisConfig
    from spikedoc.analysis.detect import find_incidents, flag_series, spike_score
    from spikedoc.analysis.diagnosis import Diagnosis, analyze
    from spikedoc.analysis.incident import CAUSES, KINDS, Incident
    from spikedoc.analysis.lints import Finding
    from spikedoc.analysis.streaming import DetectorConfig

_HOME = {
    "analyze": "diagnosis",
    "Diagnosis": "diagnosis",
    "AnalysisConfig": "config",
    "Incident": "incident",
    "Finding": "lints",
    "CAUSES": "incident",
    "KINDS": "incident",
    "DetectorConfig": "streaming",
    "find_incidents": "detect",
    "flag_series": "detect",
    "spike_score": "detect",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
