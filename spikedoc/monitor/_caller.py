"""Where a monitor warning points: the first frame of the user's loop, outside spikedoc and torch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

__all__ = ["caller_stacklevel"]

_INSIDE = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))


def caller_stacklevel() -> int:
    """`stacklevel` of the first frame outside spikedoc and torch: the loop line a warning is about."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level
