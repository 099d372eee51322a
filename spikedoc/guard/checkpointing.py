"""The guard's checkpoints as training goes: take one, and record each file once it has landed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from spikedoc.guard.agree import agree_all
from spikedoc.guard.checkpoint import CheckpointError, CheckpointStore
from spikedoc.guard.restore import TrainingState
from spikedoc.monitor import Monitor

__all__ = ["Checkpointer"]


class Checkpointer:
    """Saves the training state with the guard's own (`take`) and records the files that landed
    (`checkpoint` events) or failed (`checkpoint_failed`: a warning, never a crash)."""

    def __init__(self, store: CheckpointStore, state: TrainingState, *, monitor: Callable[[], Monitor],
                 warn_once: Callable[[str, str], None]) -> None:  # fmt: skip
        self.store, self.state = store, state
        self._monitor = monitor
        self._warn_once = warn_once

    def take(self, step: int, guard: dict[str, Any], *, healthy: bool) -> None:
        """Checkpoint step `step` (the state after steps 0..step-1) with the guard's state `guard`; a
        checkpoint taken while an incident is open is not `healthy` (never a rollback target)."""
        ok = False
        try:
            payload = self.state.capture()
            payload["guard"] = guard
            self.store.save(step, payload, healthy=healthy)
            ok = True
            if self.store.coerced:
                self._warn_once("coerced", f"spikedoc guard: {', '.join(self.store.coerced[:5])} held numpy scalars; "
                                "checkpoints store them as Python numbers so that torch.load(weights_only=True) "
                                "loads them")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the guard's own failure never stops training
            self._failed(step, exc)
        ok = step not in self.report_landed() and ok  # a foreground write has landed by now
        if not agree_all(ok) and ok:  # another rank failed: this step is no common rollback target
            self.store.forget_after(step - 1)

    def report_landed(self) -> set[int]:
        """Record the checkpoint files that landed since the last call; the steps of those that failed."""
        failed = set()
        for checkpoint, error in self.store.landed():
            if error is None:
                self._monitor().event("checkpoint", at_step=checkpoint.step, path=str(checkpoint.path),
                                      healthy=checkpoint.healthy, guard=True)  # fmt: skip
            else:
                failed.add(checkpoint.step)
                self._failed(checkpoint.step, error)
        return failed

    def _failed(self, step: int, error: BaseException) -> None:
        # Warn, record, go on with older checkpoints. A state refused for what it holds is refused
        # at every checkpoint: one warning says it.
        message = f"spikedoc guard: checkpoint of step {step} failed ({error}); training continues"
        if isinstance(error, CheckpointError) and "weights_only" in str(error):  # no step in it: the same each time
            self._warn_once(str(error), message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=5)
        self._monitor().event("checkpoint_failed", at_step=step, error=str(error), guard=True)
