"""Follow a run while it is written: each new step part and the live file read once, through the input
gate, judged with the streaming detector; the guard's actions shown as they happen."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.markup import escape

from spikedoc.analysis._robust import fmt
from spikedoc.analysis.guard_actions import GUARD_EVENT_KINDS
from spikedoc.detector.streaming import DetectorConfig, StreamingDetector
from spikedoc.errors import RunNotFoundError, one_line
from spikedoc.report.guard_words import action_line
from spikedoc.store.live import announce, read_live
from spikedoc.store.reader import read_meta, read_part
from spikedoc.store.schema import EVENTS, META_FILE, STEPS
from spikedoc.store.validate import coerce_part

__all__ = ["Alert", "PollResult", "RunFollower", "print_events", "print_progress"]

logger = logging.getLogger(__name__)

# Finished part files only: the writer renames a complete part to this name (temp files differ).
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")
_RANK = re.compile(r"rank=(\d+)")
_COLUMNS = ("step", "segment", "loss", "grad_norm", "lr")
# Bits of a step in the (segment, step) key of `_fresh`: steps up to 2^42 (4e12), segments up to 2^21.
_STEP_BITS = 42


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
    """What one poll found: the latest step's values, the alerts among the new rows, the guard's new
    actions (`kind`, `step`, `detail`) and what was skipped (an unreadable part)."""

    new_steps: int
    step: int | None = None
    loss: float = math.nan
    grad_norm: float = math.nan
    lr: float = math.nan
    alerts: list[Alert] = field(default_factory=list)
    guard: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class RunFollower:
    """Reads the step and event parts of one rank as they land, then its live file (the rows not in a
    part yet, kept by the writer while `interval` is announced), through the input gate, and runs a
    streaming detector per series.

    The loss is judged as it is, the grad norm on a log scale, with the same detector `analyze` and
    the guard use, so an alert here is a flag `spikedoc analyze` would also raise at that step. Each
    row is judged once, in (segment, step) order.

    Example:
        >>> follower = RunFollower("runs/exp1", interval=2.0)  # doctest: +SKIP
        >>> follower.poll().step  # doctest: +SKIP
        1299
    """

    def __init__(self, run_dir: str | Path, *, config: DetectorConfig | None = None, rank: int = 0,
                 interval: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.exists():
            raise RunNotFoundError(f"{self.run_dir}: no such file or directory")
        if not self.run_dir.is_dir() or (not (self.run_dir / META_FILE).exists() and any(self.run_dir.iterdir())):
            raise RunNotFoundError(f"{self.run_dir} is not a spikedoc run directory (no {META_FILE}); "
                                   "tail follows a run written by spikedoc.watch")
        self.rank = rank
        self.interval = interval
        """Seconds between polls, announced to the writer so that it keeps a live file (None: parts only)."""
        config = config or DetectorConfig()
        self._detectors = {
            "loss": StreamingDetector(config),
            "grad_norm": StreamingDetector(config, log_scale=config.grad_norm_log_scale),
        }
        self._flagged = {name: False for name in self._detectors}
        self._read_parts: dict[str, set[tuple[int, int]]] = {STEPS: set(), EVENTS: set()}
        self._fed: tuple[int, int] | None = None  # (segment, step) of the last row judged
        self._shown: set[tuple[Any, ...]] = set()  # guard events shown (from the live file, then a part)
        self._meta_checked = False
        self.steps_read = 0
        if self.started:
            self._check_meta()

    @property
    def started(self) -> bool:
        """Whether the run has written its metadata yet."""
        return (self.run_dir / META_FILE).exists()

    def poll(self) -> PollResult:
        """Read the parts (then the live file) that appeared since the last poll and judge their new
        rows, in write order.

        Raises:
            RunFormatError, UnsupportedVersionError: meta.json or a part is malformed, as `analyze` would say.
        """
        self._check_meta()
        if self.interval is not None and self._meta_checked:  # into a run, never into a directory still empty
            announce(self.run_dir, self.interval)
        warnings: list[str] = []
        tables = self._new_rows(STEPS, _COLUMNS, warnings)
        rows = _fresh(pa.concat_tables(tables, promote_options="permissive") if tables else None, self._fed)
        guard = self._guard_events(warnings)
        if rows is None:
            return PollResult(new_steps=0, guard=guard, warnings=warnings)
        data = {c: rows[c].to_numpy(zero_copy_only=False).astype(np.float64) if c in rows.column_names else None
                for c in _COLUMNS}
        alerts = self._judge(data)
        self._fed = (int(data["segment"][-1]), int(data["step"][-1]))
        self.steps_read += rows.num_rows
        last = {c: (float(v[-1]) if v is not None else math.nan) for c, v in data.items()}
        return PollResult(new_steps=rows.num_rows, step=int(last["step"]), loss=last["loss"], grad_norm=last["grad_norm"],
                          lr=last["lr"], alerts=alerts, guard=guard, warnings=warnings)

    def _check_meta(self) -> None:
        if not self._meta_checked and self.started:
            read_meta(self.run_dir / META_FILE)  # the same checks as analyze's
            self._meta_checked = True

    def _judge(self, data: dict[str, np.ndarray | None]) -> list[Alert]:
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
        return sorted(alerts, key=lambda a: a.step)

    def _new_rows(self, table: str, columns: tuple[str, ...] | None, warnings: list[str]) -> list[pa.Table]:
        """Rows of the parts of `table` not read yet, in write order, then those of its live file when
        every part its rows come after has been read (else at the next poll)."""
        found = []
        for key, path in self._new_parts(table):
            self._read_parts[table].add(key)
            try:
                data = read_part(path, columns=columns, warnings=warnings)
            except (pa.ArrowException, OSError) as exc:
                warnings.append(f"skipped unreadable part {path}: {one_line(exc)}")
                continue
            found.append(_with_segment(data, key[0]))
        live = read_live(self.run_dir, table, self.rank)
        if live is not None and live.table.num_rows and "step" in live.table.column_names:
            # Listed after the live file was read: a part the writer renamed before writing it is seen.
            earlier = {(live.segment, q) for q, _ in self._parts_of(table, live.segment) if q < live.next_seq}
            if earlier <= self._read_parts[table]:
                data = coerce_part(live.table, source=f"{self.run_dir}/live", lenient=False, warnings=warnings)
                keep = [c for c in data.column_names if columns is None or c in columns]
                found.append(_with_segment(data.select(keep), live.segment))
        return found

    def _guard_events(self, warnings: list[str]) -> list[dict[str, Any]]:
        tables = self._new_rows(EVENTS, None, warnings)
        shown = []
        for table in tables:
            for row in table.to_pylist():
                try:
                    detail = json.loads(row.get("detail") or "{}")
                except ValueError:
                    detail = {}
                if row.get("kind") not in GUARD_EVENT_KINDS:
                    continue
                key = (row.get("segment"), row.get("step"), row.get("kind"), row.get("time"))
                if key not in self._shown:
                    self._shown.add(key)
                    shown.append({"kind": row["kind"], "step": int(row["step"]), "detail": detail})
        return shown

    def _parts_of(self, table: str, segment: int | None = None) -> list[tuple[int, Path]]:
        """(seq, path) of this rank's finished parts of `table` (of one segment, or (segment, seq) keys)."""
        found = []
        for rank_dir in (self.run_dir / table).glob("rank=*"):
            match = _RANK.fullmatch(rank_dir.name)
            if not match or int(match[1]) != self.rank:
                continue
            for part in rank_dir.iterdir():
                name = _PART.fullmatch(part.name)
                if name and (segment is None or int(name[1]) == segment):
                    found.append(((int(name[1]), int(name[2])), part))
        return [(key[1], path) for key, path in sorted(found)] if segment is not None else sorted(found)

    def _new_parts(self, table: str) -> list[tuple[tuple[int, int], Path]]:
        return [(key, path) for key, path in self._parts_of(table) if key not in self._read_parts[table]]


def _with_segment(data: pa.Table, segment: int) -> pa.Table:
    if "segment" in data.column_names:
        return data
    return data.append_column("segment", pa.array(np.full(data.num_rows, segment, dtype=np.int32)))


def _fresh(rows: pa.Table | None, fed: tuple[int, int] | None) -> pa.Table | None:
    """The rows after the last one judged, in (segment, step) order: a part's rows the live file
    already showed, or a part written twice, are not judged again."""
    if rows is None or rows.num_rows == 0:
        return None
    segment = rows["segment"].to_numpy(zero_copy_only=False).astype(np.int64)
    step = rows["step"].to_numpy(zero_copy_only=False).astype(np.int64)
    key = (segment << _STEP_BITS) + step  # (segment, step) in one ordered integer
    start = (fed[0] << _STEP_BITS) + fed[1] if fed is not None else np.iinfo(np.int64).min
    keep = key > np.maximum.accumulate(np.r_[start, key[:-1]])
    return rows.filter(pa.array(keep)) if keep.any() else None


def print_progress(console: Console, update: PollResult) -> None:
    """One line for the steps read since the last look, and an ALERT line per flagged step."""
    parts = [f"step {update.step}", f"loss {fmt(update.loss)}"]
    if not math.isnan(update.grad_norm):
        parts.append(f"grad norm {fmt(update.grad_norm)}")
    if not math.isnan(update.lr):
        parts.append(f"lr {fmt(update.lr)}")
    console.print("  ".join(parts) + f"  [dim](+{update.new_steps} steps)[/dim]", soft_wrap=True)
    for alert in update.alerts:
        size = "non-finite" if not math.isfinite(alert.z) else f"{alert.z:.1f} sigma above its baseline {fmt(alert.baseline)}"
        console.print(f"[bold red]ALERT[/bold red] step {alert.step}: {alert.metric} {fmt(alert.value)} is {size}", soft_wrap=True)


def print_events(console: Console, update: PollResult) -> None:
    """The warnings and the guard's actions read since the last look, one line each."""
    for warning in update.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(one_line(warning))}", soft_wrap=True)
    for action in update.guard:
        console.print(f"[bold magenta]GUARD[/bold magenta] {escape(action_line(action))}", soft_wrap=True)
