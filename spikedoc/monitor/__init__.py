"""The in-training side: `watch(model, optimizer)` records every optimizer step to a run directory."""

from spikedoc.monitor._step import extract_loss
from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.monitor import Monitor
from spikedoc.monitor.watch import watch

__all__ = ["watch", "Monitor", "WatchConfig", "extract_loss"]
