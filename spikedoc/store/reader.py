"""Read a run: the step and event tables whole, the layer table only for the step windows asked for."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spikedoc.errors import RunFormatError, RunNotFoundError, UnsupportedVersionError, one_line
from spikedoc.store.schema import EVENT_COLUMNS, EVENTS, FORMAT_VERSION, LAYERS, META_FILE, STEPS
from spikedoc.store.run import Run, decoded, empty, sorted_frame, to_pandas
from spikedoc.store.validate import (Hole, MemoryBudget, coerce_part, holes_of_steps, keep_last_duplicates,
                                     unwritten_before_resumes)

__all__ = ["Run", "load", "read_meta", "read_part"]

logger = logging.getLogger(__name__)

_RANK_DIR = re.compile(r"rank=(\d+)")
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")
_LAYOUT = (
    "a spikedoc run directory holds meta.json and steps/rank=N/part-*.parquet; "
    "spikedoc also reads a .csv file (step,loss,...) or a TensorBoard log dir (events.out.tfevents.*)"
)
# Threads reading part files of the step and event tables. A part of 100 steps costs ~1-1.5 ms,
# nearly all of it per-file overhead; a second thread overlaps the part of it that releases the GIL.
_READERS = min(4, os.cpu_count() or 1)
# Consecutive parts one thread reads and merges into one contiguous table: 10,000 parts of 100
# rows kept as 10,000 chunks cost ~60% more memory than their data (a buffer per column per part).
_COMBINE = 128
# A Parquet file ends with its footer's length (4 bytes, little-endian) and the magic bytes; the
# smallest whole file is the leading magic, a footer of at least one byte, its length and the magic.
_MAGIC = b"PAR1"
_MIN_PARQUET_BYTES = 13


def load(path: str | Path, *, lenient: bool = False) -> Run:
    """Load a spikedoc run directory, a CSV log or a TensorBoard log directory.

    Args:
        path: A run directory (holds `meta.json`), a `.csv` file, or a directory holding
            `events.out.tfevents.*` files anywhere below it.
        lenient: Read cells that are not numbers (text in a numeric column) as missing, with a
            warning, instead of raising `RunFormatError`.

    Returns:
        The run; `run.missing` lists what the source lacks for analysis.

    Raises:
        RunNotFoundError: The path does not exist or holds nothing spikedoc reads.
        RunFormatError: meta.json or the Parquet parts are malformed beyond skipping, or a cell of
            a numeric column is not a number (without `lenient`).
        RunTooLargeError: The step or event table would not fit in the memory available.
        UnsupportedVersionError: The run was written in a newer run format.

    Example:
        >>> import spikedoc
        >>> run = spikedoc.load("runs/exp1")  # doctest: +SKIP
        >>> run.steps.plot(x="step", y="loss")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise RunNotFoundError(f"{path}: no such file or directory")
    from spikedoc.store import importers  # pulls in tensorboard only when needed

    if path.is_file():
        if path.suffix.lower() == ".csv":
            return importers.read_csv(path, lenient=lenient)
        if path.name.startswith("events.out.tfevents."):
            return importers.read_tensorboard(path)
        raise RunNotFoundError(f"{path} is not a run: {_LAYOUT}")
    if (path / META_FILE).exists():
        return _load_spikedoc(path, lenient)
    if next(path.rglob("events.out.tfevents.*"), None) is not None:
        return importers.read_tensorboard(path)
    what = "an empty directory" if next(path.iterdir(), None) is None else "not a run"
    raise RunNotFoundError(f"{path} is {what}: {_LAYOUT}")


def _load_spikedoc(path: Path, lenient: bool) -> Run:
    meta = read_meta(path / META_FILE)
    run = Run(path=path, source="spikedoc", meta=meta, steps=empty(("step", "segment", "rank")))
    read = _read_table(run, STEPS, lenient)
    if read.frame is None:
        raise RunFormatError(f"{path} has no step rows: the run ended before its first flush ({_LAYOUT})")
    run.steps = keep_last_duplicates(sorted_frame(read.frame, ["rank", "segment", "step"]), source=f"{path}/{STEPS}",
                                     warnings=run.warnings)
    events = _read_table(run, EVENTS, lenient).frame
    run.events = empty((*EVENT_COLUMNS, "rank")) if events is None else sorted_frame(events, ["rank", "segment", "step"])
    run._layer_parts = _whole_layer_parts(run, read.ranges)
    run.holes = holes_of_steps(run.steps, read.ranges, read.failed) + run.holes
    run.warnings += unwritten_before_resumes(run.steps)
    if not run.has_layers:
        run.missing.append("layers")
    return run


def read_meta(path: Path) -> dict[str, Any]:
    """`meta.json` of a run, checked: a JSON object with a `format_version` this spikedoc reads.

    Raises:
        RunFormatError: Not readable JSON, not an object, or no valid `format_version`.
        UnsupportedVersionError: A newer run format.
    """
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFormatError(f"{path} is not readable JSON: {one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise RunFormatError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunFormatError(f"{path} has no valid format_version (found {version!r})")
    if version > FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"{path.parent} uses run format {version}, this spikedoc reads format {FORMAT_VERSION} and older: "
            "upgrade spikedoc (pip install -U spikedoc)"
        )
    return meta


def _keyed_parts(table_dir: Path) -> list[tuple[tuple[int, int, int], Path]]:
    """Complete part files of a table keyed by (rank, segment, seq), in write order; temp files are ignored."""
    found = []
    for rank_dir in table_dir.iterdir() if table_dir.is_dir() else []:
        match = _RANK_DIR.fullmatch(rank_dir.name)
        if not (match and rank_dir.is_dir()):
            continue
        for part in rank_dir.iterdir():
            name = _PART.fullmatch(part.name)
            if name:
                found.append(((int(match[1]), int(name[1]), int(name[2])), part))
    return sorted(found)


def _whole_layer_parts(run: Run, step_ranges: dict[tuple[int, int, int], tuple[int, int]]) -> list[tuple[Path, int]]:
    """Layer parts that end in a Parquet footer; the others are skipped with a warning and a hole now.

    The layer table is read only in windows, when an analysis asks for them; a part cut short (an
    interrupted copy, a full disk) is found here instead, at load, with the other skipped parts,
    so that whoever takes `run.warnings` (`analyze`'s diagnosis, the report) names it. The check
    reads 8 bytes per part; the footer itself is parsed on the first `layers()` call. A layer part
    holds the layer rows of the step part with the same (segment, seq) (the writer numbers a
    batch's parts alike), so the hole's steps are that step part's.
    """
    whole = []
    for (rank, segment, seq), path in _keyed_parts(run.path / LAYERS):
        problem = _not_whole_parquet(path)
        if problem is None:
            whole.append((path, rank))
            continue
        run._skip(path, f"{problem}; per-tensor attribution lacks the rows it held")
        first, last = step_ranges.get((rank, segment, seq), (None, None))
        run.holes.append(Hole(table=LAYERS, rank=rank, segment=segment, first_step=first, last_step=last,
                              cause=f"unreadable part {path}: {problem}"))
    return whole


def _not_whole_parquet(path: Path) -> str | None:
    """Why `path` cannot be a complete Parquet file, judged from its last 8 bytes; None if it can be."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            if size < _MIN_PARQUET_BYTES:
                return f"{size} bytes, too short for a Parquet file"
            file.seek(-8, os.SEEK_END)
            tail = file.read(8)
    except OSError as exc:
        return one_line(exc)
    footer = int.from_bytes(tail[:4], "little")
    if tail[4:] != _MAGIC or not 0 < footer <= size - 12:
        return "no Parquet footer at its end (cut short or not a Parquet file)"
    return None


@dataclass
class _TableRead:
    """A small table read whole: its rows (None when it has no parts), and per part key
    (rank, segment, seq) the step range of each readable part and why each unreadable one failed."""

    frame: pd.DataFrame | None
    ranges: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)
    failed: dict[tuple[int, int, int], tuple[Path, str]] = field(default_factory=dict)


def _read_table(run: Run, table: str, lenient: bool) -> _TableRead:
    """All parts of a small table concatenated, each through the input gate, skipping unreadable ones."""
    parts = _keyed_parts(run.path / table)
    if not parts:
        return _TableRead(None)
    budget = MemoryBudget(what=f"{run.path}/{table} ({len(parts)} parts)")
    # Each thread reads a run of consecutive parts and merges them into one contiguous block (kept
    # one by one, a buffer per column per part costs ~60% more than the data); the blocks are then
    # converted column by column, each column's Arrow memory freed as soon as pandas holds it.
    groups = [parts[i : i + _COMBINE] for i in range(0, len(parts), _COMBINE)]
    blocks: list[pa.Table | pd.DataFrame] = []
    read = _TableRead(None)
    with ThreadPoolExecutor(_READERS) as pool:
        for group in pool.map(functools.partial(_read_group, lenient=lenient, budget=budget), groups):
            for key, (path, exc) in group.failed.items():
                run._skip(path, exc)
                read.failed[key] = (path, one_line(exc))
            for message in group.warnings:
                run.warnings.append(message)
                logger.warning("spikedoc: %s", message)
            read.ranges.update(group.ranges)
            if group.block is not None:
                blocks.append(group.block)
    if not blocks:
        raise RunFormatError(f"{run.path}/{table}: none of its {len(parts)} part files is readable: {run.warnings[-1]}")
    read.frame = _concatenated(blocks)
    return read


def _concatenated(blocks: list[pa.Table | pd.DataFrame]) -> pd.DataFrame:
    if all(isinstance(b, pa.Table) for b in blocks):
        try:
            data = pa.concat_tables(blocks, promote_options="permissive")
        except pa.ArrowException:
            pass
        else:
            del blocks
            return to_pandas(data, self_destruct=True)
    # A column that changed type between parts (e.g. int in one segment, string in the next).
    return pd.concat([b if isinstance(b, pd.DataFrame) else to_pandas(b) for b in blocks], ignore_index=True)


@dataclass
class _Group:
    """Consecutive parts read by one thread: their merged rows and what `_TableRead` keeps of each part."""

    block: pa.Table | pd.DataFrame | None = None
    ranges: dict[tuple[int, int, int], tuple[int, int]] = field(default_factory=dict)
    failed: dict[tuple[int, int, int], tuple[Path, Exception]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _read_group(parts: list[tuple[tuple[int, int, int], Path]], *, lenient: bool, budget: MemoryBudget) -> _Group:
    """Consecutive parts read, checked and merged into one contiguous block (union of their columns;
    pandas unifies conflicting types), with the parts that could not be read."""
    out, tables = _Group(), []
    for key, path in parts:
        try:
            data = read_part(path, lenient=lenient, warnings=out.warnings, budget=budget)
        except (pa.ArrowException, OSError) as exc:
            out.failed[key] = (path, exc)
            continue
        if data.num_rows:
            span = pc.min_max(data["step"])
            out.ranges[key] = (span["min"].as_py(), span["max"].as_py())
        tables.append(data.append_column("rank", pa.array(np.full(data.num_rows, key[0], dtype=np.int64))))
    if tables:
        try:
            out.block = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
        except pa.ArrowException:
            out.block = pd.concat([to_pandas(t) for t in tables], ignore_index=True)
    return out


def read_part(path: Path, *, columns: Iterable[str] | None = None, lenient: bool = False,
              warnings: list[str], budget: MemoryBudget | None = None) -> pa.Table:
    """One part file of the step or event table through the input gate (`validate.coerce_part`).

    Args:
        path: The part.
        columns: Columns to read besides `step` and `segment` (all when None; absent ones are skipped).
        lenient: Read cells that are not numbers as missing (said in `warnings`).
        warnings: Where what was coerced or left out is said.
        budget: Memory the table being read may still take; the part's data (its footer says how
            much) is taken from it before it is read.

    Raises:
        pyarrow.ArrowException, OSError: The file is not readable Parquet (a reader skips it).
        RunFormatError: It has no `step` column, or a cell that cannot be read (see `coerce_part`).
        RunTooLargeError: The part's data exceeds what is left of `budget`.
    """
    with pq.ParquetFile(path) as part:  # parses the footer only
        present = part.metadata.schema.names
        if "step" not in present:
            raise RunFormatError(f"{path} lacks the required column 'step' (columns: {', '.join(present)})")
        if budget is not None:
            meta = part.metadata
            budget.take(sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)))
        wanted = None if columns is None else [c for c in dict.fromkeys(["step", "segment", *columns]) if c in present]
        data = decoded(part.read(columns=wanted, use_threads=False))
    return coerce_part(data, source=str(path), lenient=lenient, warnings=warnings)
