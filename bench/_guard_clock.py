"""GuardClock: the wall time a training loop spends in `spikedoc.Guard`'s own code.

Wraps the guard's entry points (handing out a batch, `record`, its forward hook, the judgement
inside `optimizer.step()`, the bookkeeping between steps) and subtracts what they call into that is
not the guard's: the optimizer's own step, the monitor it includes (its statistics, recording,
events), and drawing the batch from the data. Nested entry points count once. The wrappers add a
few microseconds of their own per call, so the figure is an upper bound.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from spikedoc.guard.data import DataStream
from spikedoc.guard.guard import Guard
from spikedoc.guard.stepping import StepJudgement
from spikedoc.monitor import Monitor

__all__ = ["GuardClock"]

_OWN = ((Guard, "__next__"), (Guard, "record"), (StepJudgement, "on_forward"), (StepJudgement, "on_step"),
        (Guard, "_finish_step"))
_MONITOR = ("record", "grad_norm", "tensor_grad_norms", "event", "densify", "skip_samples", "skip_step")


class GuardClock:
    """Accumulates the guard's own time in `seconds` while installed (`with GuardClock() as clock:`).

    Install it before the Guard is built (its forward and step hooks are bound then). The judgement
    runs in the optimizer's step pre-hook, so the optimizer's own step is outside it by itself.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_entry: dict[str, float] = dict.fromkeys((name for _, name in _OWN), 0.0)
        """The same time split by entry point (`on_step`: the judgement before the update, in the optimizer step pre-hook)."""
        self._stack: list[list[float]] = []  # per active entry point: time spent in callees not its own
        self._saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> GuardClock:
        for owner, name in _OWN:
            self._patch(owner, name, lambda fn, name=name: self._own(fn, name))
        for name in _MONITOR:
            self._patch(Monitor, name, self._excluded)
        self._patch(DataStream, "next", self._excluded)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def mark(self) -> tuple[float, float, float]:
        """(wall time, the guard's own seconds so far, of which in the judgement before the update)."""
        return time.perf_counter(), self.seconds, self.by_entry["on_step"]

    @staticmethod
    def per_step(marks: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
        """From one `mark()` per batch in hand: each step's wall time, own time and judgement time."""
        return [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks, marks[1:])]

    def _patch(self, owner: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        original = owner.__dict__[name]
        self._saved.append((owner, name, original))
        setattr(owner, name, wrap(original))

    def _own(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._stack.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                (not_mine,) = self._stack.pop()
                self.seconds += spent - not_mine
                self.by_entry[name] += spent - not_mine
                if self._stack:
                    self._stack[-1][0] += spent  # the caller's time, counted here already

        return timed

    def _excluded(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._stack:
                    self._stack[-1][0] += time.perf_counter() - start

        return timed
