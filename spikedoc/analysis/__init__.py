"""Analysis: detect incidents in a recorded run, attribute them, diagnose the cause, lint the setup.

Pure data in (pandas), findings out; this package never imports torch. Its names load on first
use, so `spikedoc.analysis.recovery` can be imported by the guard without pandas; the online
detector lives in the leaf `spikedoc.detector`.
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
    from spikedoc.detector.streaming import DetectorConfig

_HOME = {
    "analyze": "diagnosis",
    "Diagnosis": "diagnosis",
    "AnalysisConfig": "config",
    "Incident": "incident",
    "Finding": "lints",
    "CAUSES": "incident",
    "KINDS": "incident",
    "DetectorConfig": "spikedoc.detector",
    "find_incidents": "detect",
    "flag_series": "detect",
    "spike_score": "detect",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_module(_HOME[name])), name)
    globals()[name] = value
    return value


def _module(home: str) -> str:
    return home if home.startswith("spikedoc.") else f"{__name__}.{home}"


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
