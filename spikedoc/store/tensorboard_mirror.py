"""Mirror a run's rows to TensorBoard while it trains (`spikedoc.watch(..., tensorboard=DIR)`).

Runs on the run writer's background thread, next to the Parquet parts it mirrors, so training
never waits on it. Tags match `spikedoc tensorboard RUN LOGDIR`: step columns as `train/<column>`,
per-tensor metrics as `<module kind>.<metric>/<tensor>` so that TensorBoard groups them by module.
No pandas and no torch: only tensorboard's own event writer.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from spikedoc._module_kinds import module_kind

__all__ = ["STEP_TAGS", "LAYER_METRICS", "TensorBoardMirror"]

#: Step-table columns written, each as `train/<column>`.
STEP_TAGS = ("loss", "grad_norm", "lr", "clip_coef", "param_norm", "update_norm", "loss_scale", "step_time")
#: Per-tensor columns written as `<module kind>.<metric>/<tensor name>`: TensorBoard groups charts by
#: the tag's first path part, so each (module kind, metric) pair is one collapsible section.
LAYER_METRICS = ("grad_norm", "update_ratio", "eps_frac")


class TensorBoardMirror:
    """Writes step rows and layer blocks, as the run writer hands them over, to an event file.

    Example:
        >>> import tempfile
        >>> mirror = TensorBoardMirror(tempfile.mkdtemp(), {"h.0.attn.weight": "Linear"})
        >>> mirror("steps", [{"step": 0, "loss": 2.5}])
        >>> mirror.close()
    """

    def __init__(self, logdir: str | Path, module_types: dict[str, str | None]) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))
        self._module_types = dict(module_types)
        self._kinds: dict[str, str] = {}

    def __call__(self, table: str, items: list[Any]) -> None:
        """Mirror one batch of the writer's rows (`steps`: row dicts; `layers`: columnar blocks)."""
        if table == "steps":
            for row in items:
                self._add(int(row["step"]), row.get("time"), ((f"train/{c}", row.get(c)) for c in STEP_TAGS))
        elif table == "layers":
            for block in items:
                self._add_layers(block)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def _add_layers(self, block: dict[str, Any]) -> None:
        steps, names = np.asarray(block["step"]), [str(n) for n in block["name"]]
        metrics = [m for m in LAYER_METRICS if m in block]
        for step in np.unique(steps):
            rows = np.flatnonzero(steps == step)
            points = ((f"{self._kind(names[i])}.{m}/{names[i]}", block[m][i]) for m in metrics for i in rows)
            self._add(int(step), None, points)

    def _kind(self, name: str) -> str:
        if name not in self._kinds:
            self._kinds[name] = module_kind(name, self._module_types.get(name))
        return self._kinds[name]

    def _add(self, step: int, wall: Any, points: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in points if _number(v)]
        if values:
            when = float(wall) if _number(wall) else time.time()
            self._writer.add_event(Event(wall_time=when, step=step, summary=Summary(value=values)))


def _number(value: Any) -> bool:
    try:
        return value is not None and not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
