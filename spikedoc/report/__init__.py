"""Views of a run and its diagnosis: the terminal report, the HTML page, a TensorBoard export, a live tail.

Names are imported on first use, so the terminal report does not pull in matplotlib or tensorboard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["render", "render_html", "export_tensorboard", "RunFollower", "envelope"]

_LAZY = {
    "render": "spikedoc.report.terminal",
    "render_html": "spikedoc.report.html",
    "export_tensorboard": "spikedoc.report.tensorboard",
    "RunFollower": "spikedoc.report.tail",
    "envelope": "spikedoc.report.envelope",
}

if TYPE_CHECKING:
    from spikedoc.report.envelope import envelope
    from spikedoc.report.html import render_html
    from spikedoc.report.tail import RunFollower
    from spikedoc.report.tensorboard import export_tensorboard
    from spikedoc.report.terminal import render


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spikedoc.report' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
