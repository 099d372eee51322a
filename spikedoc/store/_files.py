"""The files of a run directory written whole or not at all: a temporary name first, then a rename."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["parts_on_disk", "temporary_of", "warm_up", "write_parquet_whole", "write_whole"]


def temporary_of(path: Path) -> Path:
    """The hidden name `path` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def write_parquet_whole(data: pa.Table, path: Path, **options: Any) -> None:
    """`pq.write_table` to a temporary name, renamed to `path` when complete; a failure removes the
    temporary and raises."""
    tmp = temporary_of(path)
    try:
        pq.write_table(data, tmp, **options)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_whole(path: Path, data: str | bytes, *, temporary: Path | None = None) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary name (`temporary_of`, or
    `temporary` where several processes may write it at once), renamed when complete; a failure
    removes the temporary and raises."""
    tmp = temporary if temporary is not None else temporary_of(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def parts_on_disk(folder: Path) -> list[tuple[int, int]]:
    """(segment, seq) of the complete part files in one table/rank folder."""
    found = []
    for path in folder.glob("part-*.parquet") if folder.is_dir() else []:
        fields = path.stem.split("-")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            found.append((int(fields[1]), int(fields[2])))
    return found


@functools.cache
def warm_up() -> None:
    """Run pyarrow's lazy imports (its pandas shim, the zstd codec) on the caller's thread.

    Otherwise the first conversion happens on the writer thread, and when that is at interpreter
    exit (rows buffered, close() from atexit) the imports fail with "can't register atexit after
    shutdown" and the rows are lost.
    """
    table = pa.table({"step": pa.array([0], pa.int64()), "name": pa.array(["x"], pa.string())})
    pq.write_table(table.sort_by("step"), pa.BufferOutputStream(), compression="zstd", use_dictionary=["name"])
