"""A GradScaler's `update()`, watched: where a step it skipped for inf/NaN gradients becomes visible."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["unwatch_updates", "watch_updates"]


def watch_updates(scaler: Any, before_update: Callable[[], None]) -> None:
    """Call `before_update()` at each `scaler.update()`, before the scale changes.

    The scaler's `step()` skips `optimizer.step()` (and so the step hooks) when the gradients hold
    inf/NaN; only its next `update()` shows that a step went by.
    """
    original = scaler.update

    def update(new_scale: Any = None) -> Any:
        before_update()
        return original(new_scale)

    scaler.update = update


def unwatch_updates(scaler: Any) -> None:
    """The scaler's own `update()` again."""
    if "update" in vars(scaler):
        del scaler.update
