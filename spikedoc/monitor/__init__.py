"""The in-training side: `watch(model, optimizer)` records every optimizer step to a run directory."""

from spikedoc.monitor.monitor import Monitor, WatchConfig, watch

__all__ = ["watch", "Monitor", "WatchConfig"]
