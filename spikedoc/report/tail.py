"""Follow a run while it is written: read each new step part once, judge it with the streaming detector."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spikedoc.analysis.streaming import DetectorConfig, StreamingDetector
from spikedoc.errors import RunNotFoundError, one_line
from spikedoc.store.schema import META_FILE, STEPS

__all__ = ["Alert", "PollResult", "RunFollower"]

logger = logging.getLogger(__name__)

# Finished part files only: the writer renames a complete part to this name (temp files differ).
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")
_RANK = re.compile(r"rank=(\d+)")
_COLUMNS = ("step", "loss", "grad_norm", "lr")


@dataclass(frozen=True)
class Alert:
    """The streaming detector flagged `metric` at `step`: the first flag of a new out-of-band streak."""

    step: int
    metric: str
    value: float
    baseline: float
    z: float


@dataclass(frozen=True)
class PollResult:
    """What one poll found: the latest step's values and the alerts among the new rows."""

    new_steps: int
    step: int | None = None
    loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = math.nan
    alerts: list[Alert] = field(default_factory=list)


class RunFollower:
    """Reads the step parts of one rank as they land and runs a streaming detector per series.

    The loss is judged as it is, the grad norm on a log scale, with the same detector `analyze` and
    the guard use, so an alert here is a flag `spikedoc analyze` would also raise at that step.

    Example:
        >>> follower = RunFollower("runs/exp1")  # doctest: +SKIP
        >>> follower.poll().step  # doctest: +SKIP
        1299
    """

    def __init__(self, run_dir: str | Path, *, config: DetectorConfig | None = None, rank: int = 0) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.exists():
            raise RunNotFoundError(f"{self.run_dir}: no such file or directory")
        if not self.run_dir.is_dir() or (not (self.run_dir / META_FILE).exists() and any(self.run_dir.iterdir())):
            raise RunNotFoundError(f"{self.run_dir} is not a spikedoc run directory (no {META_FILE}); "
                                   "tail follows a run written by spikedoc.watch")
        self.rank = rank
        config = config or DetectorConfig()
        self._detectors = {
            "loss": StreamingDetector(config),
            "grad_norm": StreamingDetector(config, log_scale=config.grad_norm_log_scale),
        }
        self._flagged = {name: False for name in self._detectors}
        self._seen: set[str] = set()
        self.steps_read = 0

    @property
    def started(self) -> bool:
        """Whether the run has written its metadata yet."""
        return (self.run_dir / META_FILE).exists()

    def poll(self) -> PollResult:
        """Read the parts that appeared since the last poll and judge their rows, in step order."""
        rows = [table for path in self._new_parts() if (table := self._read(path)) is not None]
        if not rows:
            return PollResult(new_steps=0)
        table = pa.concat_tables(rows, promote_options="permissive")
        data = {c: table[c].to_numpy(zero_copy_only=False).astype(np.float64) if c in table.column_names else None
                for c in _COLUMNS}
        alerts = []
        for name, detector in self._detectors.items():
            values = data[name]
            if values is None:
                continue
            for step, value in zip(data["step"].astype(np.int64).tolist(), values.tolist()):
                if math.isnan(value) and name == "grad_norm":
                    continue  # not recorded at this step
                flag = detector.update(step, value)
                if flag.flagged and not self._flagged[name]:
                    alerts.append(Alert(step=step, metric=name, value=value, baseline=flag.baseline, z=flag.z))
                self._flagged[name] = flag.flagged
        self.steps_read += table.num_rows
        last = {c: (float(v[-1]) if v is not None else math.nan) for c, v in data.items()}
        return PollResult(new_steps=table.num_rows, step=int(last["step"]), loss=last["loss"], grad_norm=last["grad_norm"],
                        lr=last["lr"], alerts=sorted(alerts, key=lambda a: a.step))

    def _new_parts(self) -> list[Path]:
        found = []
        for rank_dir in (self.run_dir / STEPS).glob("rank=*"):
            match = _RANK.fullmatch(rank_dir.name)
            if not match or int(match[1]) != self.rank:
                continue
            for part in rank_dir.iterdir():
                name = _PART.fullmatch(part.name)
                if name and part.name not in self._seen:
                    found.append(((int(name[1]), int(name[2])), part))
        return [part for _, part in sorted(found)]

    def _read(self, path: Path) -> pa.Table | None:
        self._seen.add(path.name)
        try:
            present = pq.read_schema(path).names
            return pq.read_table(path, columns=[c for c in _COLUMNS if c in present])
        except (pa.ArrowException, OSError) as exc:
            logger.warning("spikedoc: skipped unreadable part %s: %s", path, one_line(exc))
            return None
