"""The spike detector: a robust rolling baseline per series, judged one step at a time.

A leaf: plain Python (no torch, no pandas, no numpy), imported by the monitor's cost budget, the
guard, the framework callbacks, `spikedoc tail` and the offline analysis, which all run this one rule.
"""

from spikedoc.detector.streaming import DetectorConfig, Flag, StreamingDetector

__all__ = ["DetectorConfig", "Flag", "StreamingDetector"]
