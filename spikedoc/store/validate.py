"""The one gate a table passes on its way in: column types, unparseable cells, duplicate rows, holes, size.

The Parquet reader, the CSV and TensorBoard importers and `spikedoc tail` all read through these
functions, so a run reads the same whichever command reads it. What each check decides is
documented in docs/run-format.md ("Reading a run: what is checked").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from spikedoc.errors import RunFormatError, RunTooLargeError
from spikedoc.store.schema import STEP_COLUMN_DOCS, STEPS

__all__ = [
    "Hole",
    "JUDGED",
    "KEYS",
    "MemoryBudget",
    "available_memory",
    "check_fits",
    "coerce_part",
    "find_holes",
    "holes_of_steps",
    "unwritten_before_resumes",
    "keep_last_duplicates",
    "numbers",
]

#: A step row's identity: one row per (rank, segment, step).
KEYS = ("rank", "segment", "step")
#: A gap of at least this many of a log's usual step strides holds a step that should be there:
#: a log every `k` steps (or every step, `k = 1`) that jumps by `2k` or more lost a row.
_HOLE_STRIDES = 2
#: Cells shown by an error about unparseable cells (the count says how many more).
_SHOWN = 3
#: Series the detector judges, where a missing value reads as a non-finite one: a row whose cell
#: here was not a number is left out under --lenient, not read as NaN.
JUDGED = ("loss", "grad_norm")
#: Step columns the run format documents as numbers (docs/run-format.md): a text cell there is an error.
_NUMERIC = frozenset(name for name, doc in STEP_COLUMN_DOCS.items() if doc.startswith(("int", "float")))


@dataclass(frozen=True, kw_only=True)
class Hole:
    """Steps a table should hold and does not: an unreadable part, or steps missing from a log.

    `first_step`/`last_step` bound the missing steps (both included); None where the hole reaches
    past the last (first) step read, e.g. an unreadable last part.
    """

    table: str
    rank: int
    segment: int
    first_step: int | None
    last_step: int | None
    cause: str

    @property
    def steps(self) -> str:
        """The missing steps in words: `steps 100..199`, `steps after 399`."""
        if self.first_step is None and self.last_step is None:
            return "every step"
        if self.first_step is None:
            return f"steps before {self.last_step + 1}"
        if self.last_step is None:
            return f"steps after {self.first_step - 1}"
        return f"step {self.first_step}" if self.first_step == self.last_step else f"steps {self.first_step}..{self.last_step}"

    def describe(self) -> str:
        """One line: which table, which steps, why."""
        where = f"rank {self.rank}, segment {self.segment}"
        what = "layer rows" if self.table == "layers" else "step rows"
        return f"{what} of {self.steps} missing ({where}): {self.cause}"

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "rank": self.rank, "segment": self.segment, "first_step": self.first_step,
                "last_step": self.last_step, "cause": self.cause, "steps": self.steps, "text": self.describe()}


def numbers(values: pd.Series, *, column: str, where: Callable[[Any], str], source: str, lenient: bool,
            warnings: list[str]) -> tuple[pd.Series, pd.Index]:
    """`values` as float64, and the labels of its cells that are not numbers; text that is not a
    number is an error naming where it is.

    Missing cells (empty, NaN) stay missing. With `lenient`, unparseable cells are read as missing and
    a warning counts them; a caller leaves out the rows of a `JUDGED` column's unparseable cells.

    Args:
        values: The column as read (strings or numbers); its index locates each cell through `where`.
        column: The column's name, for the message.
        where: Index label -> where that cell is in the source, e.g. `"line 7"`.
        source: The file, for the message.
        lenient: Read unparseable cells as missing instead of failing.
        warnings: Where the lenient reading is said.

    Raises:
        RunFormatError: A cell is not a number (and not `lenient`).
    """
    if pd.api.types.is_numeric_dtype(values):  # read as numbers already: nothing to parse
        return values.astype("float64"), values.index[:0]
    parsed = pd.to_numeric(values, errors="coerce")
    if pd.api.types.is_bool_dtype(parsed):
        parsed = parsed.astype("float64")
    bad = np.flatnonzero(parsed.isna().to_numpy() & values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy())
    if bad.size:
        labels = values.index[bad]
        shown = ", ".join(f"{where(label)}: {values[label]!r}" for label in labels[:_SHOWN])
        more = f" and {bad.size - _SHOWN} more" if bad.size > _SHOWN else ""
        if not lenient:
            raise RunFormatError(
                f"{source}: column {column!r} has {bad.size} cells that are not numbers ({shown}{more}); "
                "fix them, or pass --lenient to read them as missing"
            )
        left_out = "; their rows are left out" if column in JUDGED else ""
        warnings.append(f"{source}: read {bad.size} cells of column {column!r} that are not numbers as missing "
                        f"(--lenient; {shown}{more}){left_out}")
    return parsed.astype("float64"), values.index[bad]


def coerce_part(table: pa.Table, *, source: str, lenient: bool, warnings: list[str]) -> pa.Table:
    """A Parquet part's step or event table with `step`/`segment` as int64/int32 and the documented
    numeric columns as numbers; text there is an error naming the part and row (see `numbers`).

    The usual part, written by `RunWriter`, has these types already and is returned as it is.
    """
    schema = table.schema  # a new object at each access: taken once
    stored = [(f.name, f.type) for f in schema if f.name in _NUMERIC]
    wrong = [name for name, typ in stored
             if not (pa.types.is_integer(typ) or (name not in ("step", "segment") and pa.types.is_floating(typ)))]
    if not wrong:
        return table
    drop = np.zeros(table.num_rows, dtype=bool)
    for name in wrong:
        values = table[name].to_pandas()
        parsed, bad = numbers(values, column=name, where=_part_row, source=source, lenient=lenient, warnings=warnings)
        if name in ("step", "segment"):
            _whole(parsed, column=name, where=_part_row, source=source)
            drop |= parsed.isna().to_numpy()  # a row without a step cannot be placed
            parsed = parsed.fillna(0).astype("int64" if name == "step" else "int32")
        elif name in JUDGED:
            drop[bad] = True
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(parsed.to_numpy()))
    return table.filter(pa.array(~drop)) if drop.any() else table


def _part_row(label: Any) -> str:
    return f"row {int(label) + 1}"


def _whole(values: pd.Series, *, column: str, where: Callable[[Any], str], source: str) -> pd.Series:
    """Whole numbers as they are (missing stays missing); a fraction or a non-finite value is an error."""
    numbers_ = values.to_numpy(dtype="float64")
    bad = np.flatnonzero(~np.isnan(numbers_) & (~np.isfinite(numbers_) | (numbers_ != np.floor(numbers_))))
    if bad.size:
        label = values.index[bad[0]]
        raise RunFormatError(f"{source}, {where(label)}: {column} {values[label]!s} is not a whole number")
    return values


def keep_last_duplicates(frame: pd.DataFrame, *, source: str, warnings: list[str]) -> pd.DataFrame:
    """One row per (rank, segment, step) of a table sorted by those keys in write order: the last
    row written wins (a part written twice, two writers of one rank and segment), with a warning.

    The whole row is kept, not a merge of its cells: a spikedoc row is one record, and a NaN in it
    is a measured non-finite value, not a gap to fill from another row.
    """
    keys = [k for k in KEYS if k in frame.columns]
    if len(frame) < 2 or not keys:
        return frame
    same = np.ones(len(frame) - 1, dtype=bool)
    for key in keys:
        column = frame[key].to_numpy()
        same &= column[1:] == column[:-1]
    if not same.any():
        return frame
    dropped = np.flatnonzero(same)  # row i repeats row i + 1's keys: row i + 1 was written later
    steps = frame["step"].to_numpy()[dropped]
    warnings.append(
        f"{source}: {dropped.size} rows repeat a (rank, segment, step) already read (steps "
        f"{_few(steps)}): kept the last row written for each, as a part written twice or two writers "
        "of one rank would leave them"
    )
    keep = np.ones(len(frame), dtype=bool)
    keep[dropped] = False
    return frame.loc[keep].reset_index(drop=True)


def find_holes(frame: pd.DataFrame, *, table: str = "steps", cause: str = "steps missing from the log") -> list[Hole]:
    """Gaps in the steps of each (rank, segment) of a table sorted by (rank, segment, step).

    A gap is a hole when it spans `_HOLE_STRIDES` or more of that stretch's usual stride (its most
    common step difference): a row the log's own rhythm says was written is not there.
    """
    holes: list[Hole] = []
    if len(frame) < 3 or "step" not in frame.columns:
        return holes
    ranks = frame["rank"].to_numpy() if "rank" in frame.columns else np.zeros(len(frame), dtype=np.int64)
    segments = frame["segment"].to_numpy() if "segment" in frame.columns else np.zeros(len(frame), dtype=np.int64)
    steps = frame["step"].to_numpy(dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, (ranks[1:] != ranks[:-1]) | (segments[1:] != segments[:-1])])
    for lo, hi in zip(starts, [*starts[1:], len(frame)]):
        diff = np.diff(steps[lo:hi])
        forward = diff[diff > 0]
        if forward.size < 2:
            continue
        stride = _usual_stride(forward)
        for i in np.flatnonzero(diff >= _HOLE_STRIDES * stride):
            before, after = int(steps[lo + i]), int(steps[lo + i + 1])
            holes.append(Hole(table=table, rank=int(ranks[lo]), segment=int(segments[lo]), first_step=before + 1,
                              last_step=after - 1, cause=cause))
    return holes


def _usual_stride(forward: np.ndarray) -> int:
    """A log's usual step stride: the most common of its (positive) step differences."""
    values, counts = np.unique(forward, return_counts=True)
    return int(values[np.argmax(counts)])


def unwritten_before_resumes(frame: pd.DataFrame) -> list[str]:
    """A warning for each resumed segment that starts further on than its rank's segment before it
    ended (by the log's stride or more): the steps between were trained and never written.

    A job resumes from a checkpoint it wrote, so a segment that resumes at step `s` says the job
    before it trained up to `s`; its rows after the last one read were lost (a kill loses the rows
    since the last flush). A resume that goes back to an earlier step leaves no gap.
    """
    if len(frame) < 2 or not {"step", "segment"} <= set(frame.columns):
        return []
    out = []
    ranks = frame["rank"].to_numpy() if "rank" in frame.columns else np.zeros(len(frame), dtype=np.int64)
    for rank, rows in frame.groupby(ranks, sort=True):
        segments = [(int(g), np.sort(r["step"].to_numpy(dtype=np.int64))) for g, r in rows.groupby("segment", sort=True)]
        for (segment, steps), (resumed_by, after) in zip(segments, segments[1:]):
            forward = np.diff(steps)[np.diff(steps) > 0]
            stride = _usual_stride(forward) if forward.size else 1
            last, resumed = int(steps[-1]), int(after[0])
            if resumed - last >= _HOLE_STRIDES * stride:
                out.append(f"steps {last + 1}..{resumed - 1} (rank {rank}) were trained by segment {segment}'s job and "
                           f"never written (a kill loses the rows since the last flush): segment {resumed_by} resumed "
                           f"at step {resumed}, and what it is compared with before the resume is step {last}")
    return out


def holes_of_steps(steps: pd.DataFrame, ranges: dict[tuple[int, int, int], tuple[int, int]],
                   failed: dict[tuple[int, int, int], tuple[Path, str]]) -> list[Hole]:
    """Gaps in a run directory's step table, each blamed on the unreadable part that sat there when one did.

    An unreadable part's steps lie between the last step of the readable part before it (same
    rank and segment, write order) and the first step of the one after; where it has no readable
    neighbour on a side, the hole reaches past the steps read on that side.

    Args:
        steps: The step table read, sorted by (rank, segment, step).
        ranges: (rank, segment, seq) of each readable part -> its (first, last) step.
        failed: (rank, segment, seq) of each unreadable part -> (its path, why).
    """
    holes = find_holes(steps, cause="steps missing from the table (no part holds them)")
    for (rank, segment, seq), (path, reason) in failed.items():
        mine = sorted((q, span) for (r, g, q), span in ranges.items() if (r, g) == (rank, segment))
        before = [span[1] for q, span in mine if q < seq]
        after = [span[0] for q, span in mine if q > seq]
        first = before[-1] + 1 if before else None
        last = after[0] - 1 if after else None
        holes = [h for h in holes if (h.rank, h.segment, h.first_step, h.last_step) != (rank, segment, first, last)]
        holes.append(Hole(table=STEPS, rank=rank, segment=segment, first_step=first, last_step=last,
                          cause=f"unreadable part {path}: {reason}"))
    return sorted(holes, key=lambda h: (h.rank, h.segment, h.first_step if h.first_step is not None else -1))


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of the machine's available memory and what
    its cgroup (a container's limit) leaves; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return max(min(found), 0) if found else None


def check_fits(needed: int, *, what: str, memory: int | None = None) -> None:
    """Refuse, before loading, a table or part whose data alone would take more memory than is available.

    Args:
        needed: Bytes the data takes once loaded (for Parquet, the uncompressed sizes its metadata states).
        what: What would be loaded, for the message.
        memory: Bytes available; None to read them now (`available_memory`).

    Raises:
        RunTooLargeError: `needed` exceeds the memory available.
    """
    memory = available_memory() if memory is None else memory
    if memory is not None and needed > memory:
        raise RunTooLargeError(
            f"{what} holds {needed / 2**30:.1f} GiB of data, more than the {memory / 2**30:.1f} GiB of memory available: "
            "not loaded; analyse it on a machine with more memory"
        )


class MemoryBudget:
    """The memory a table being read may still take, shared by the threads that read its parts.

    Each part's data, as its footer states it (uncompressed), is taken before the part is read, so
    a table that would not fit is refused (`RunTooLargeError`) before the part that would exceed the
    memory is loaded; the parts read until then are dropped with the table. The footers are parsed
    once, by the reading itself (a pass over the footers first cost 0.7 ms a part, a fifth of the load).

    Example:
        >>> budget = MemoryBudget(what="runs/exp1/steps", memory=1000)
        >>> budget.take(600)
        >>> budget.take(600)
        Traceback (most recent call last):
        ...
        spikedoc.errors.RunTooLargeError: runs/exp1/steps holds more data than the 0.0 GiB of memory available (already 0.0 GiB in the parts read so far): not loaded; analyse it on a machine with more memory
    """

    def __init__(self, *, what: str, memory: int | None = None) -> None:
        self.what = what
        self.memory = available_memory() if memory is None else memory
        self.taken = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        """Take `nbytes` for the next part; raise when they are more than what is left."""
        with self._lock:
            self.taken += nbytes
            if self.memory is not None and self.taken > self.memory:
                raise RunTooLargeError(
                    f"{self.what} holds more data than the {self.memory / 2**30:.1f} GiB of memory available (already "
                    f"{self.taken / 2**30:.1f} GiB in the parts read so far): not loaded; analyse it on a machine with "
                    "more memory"
                )


def _few(steps: np.ndarray, shown: int = 5) -> str:
    unique = np.unique(steps)
    text = ", ".join(str(int(s)) for s in unique[:shown])
    return text + (f", ... ({unique.size} in all)" if unique.size > shown else "")
