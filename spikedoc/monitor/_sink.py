"""Where finished steps go: rows assembled from their landed statistics, to the writer, the subscribers and the budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from spikedoc.monitor._plan import Plan
from spikedoc.monitor._rows import layer_block, step_row
from spikedoc.monitor._step import StepRecord
from spikedoc.monitor.budget import Cadence
from spikedoc.monitor.distributed import Ranks
from spikedoc.store.writer import RunWriter

__all__ = ["StepSink"]

Fail = Callable[[str, BaseException], None]


class StepSink:
    """Turns each finished step into its rows and hands them on, on the training thread.

    Pure Python: kept off any other thread, where it would hold the GIL against the training loop.
    """

    def __init__(self, writer: RunWriter, *, ranks: Ranks, cadence: Cadence | None, fail: Fail) -> None:
        self.writer = writer
        self.subscribers: list[Callable[[dict[str, Any]], None]] = []
        self.dropped = 0
        """Rows lost to steps whose statistics failed or could not be assembled."""
        self._ranks, self._cadence, self._fail = ranks, cadence, fail

    def take(self, st: StepRecord, plan: Plan, clip: float | None) -> None:
        """Write the rows of the finished step `st` (`clip`: `watch(clip=)`), or count them lost."""
        rows = (1 if st.logged else 0) + (len(plan.params) if st.layers else 0)
        values = None if st.broken or st.landing is None else dict(st.landing.values())
        if plan.sharded:  # every rank, every recorded step, also a lost one: a collective
            values = self._combine_shards(values, plan)
        if values is None:
            self.dropped += rows
            return
        try:
            for landing in st.late:
                values.update(landing.values())
            step = step_row(plan, clip, st, values)
            layers = layer_block(plan, st, values) if st.layers else None
        except Exception as exc:  # noqa: BLE001
            self.dropped += rows
            self._fail("assemble", exc)
            return
        if st.logged:
            self.writer.add_step(step)
        if layers is not None:
            self.writer.add_layers(layers)
        if st.logged:
            self._tell_subscribers(step)
        if self._cadence is not None:
            self._cadence.observe(step if st.logged else None, full=st.full, cost=st.cost, step_time=st.busy_time)

    def _tell_subscribers(self, row: dict[str, Any]) -> None:
        for callback in self.subscribers:
            try:
                callback(row)
            except Exception as exc:  # noqa: BLE001 - monitoring never stops training
                self._fail("subscriber", exc)

    def _combine_shards(self, values: dict[str, np.ndarray] | None, plan: Plan) -> dict[str, np.ndarray] | None:
        try:
            return self._ranks.combine(values, plan.shard_masks)
        except Exception as exc:  # noqa: BLE001 - monitoring never stops training
            self._fail("combine_shards", exc)
            return None
