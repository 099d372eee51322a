"""Analysis: detect incidents in a recorded run, attribute them, diagnose the cause, lint the setup.

Pure data in (pandas), findings out; this package never imports torch.
"""

from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.detect import DetectorConfig, find_incidents, flag_series, spike_score
from spikedoc.analysis.diagnosis import Diagnosis, analyze
from spikedoc.analysis.incident import CAUSES, KINDS, Incident
from spikedoc.analysis.lints import Finding

__all__ = [
    "analyze",
    "Diagnosis",
    "AnalysisConfig",
    "Incident",
    "Finding",
    "CAUSES",
    "KINDS",
    "DetectorConfig",
    "find_incidents",
    "flag_series",
    "spike_score",
]
