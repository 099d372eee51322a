"""The live view: a `spikedoc tail` announces itself, the writer then keeps the unflushed rows in a live file.

Parts land every `flush_every` steps or `flush_seconds` (100 steps, 30 s by default), too seldom to
follow a run by. While a tail is attached the writer also rewrites, every tail interval, one small
file per rank with the step and event rows it holds but has not written to a part yet; with no
tail it costs the writer thread one `stat` a second. Both sides of the exchange are here, so they
agree by construction (docs/run-format.md, "Live view").
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spikedoc.store._files import temporary_of, write_parquet_whole, write_whole
from spikedoc.store.schema import EVENTS, STEPS

__all__ = ["LIVE_DIR", "HEARTBEAT", "LiveFile", "LiveWriter", "announce", "live_path", "read_live"]

#: Folder of the live view in a run directory (not a table: readers of parts never look in it).
LIVE_DIR = "live"
#: The file a tail rewrites at every poll, holding its interval in seconds: its age says it is attached.
HEARTBEAT = "tail"
#: Seconds between the writer's looks for a tail when none is attached.
CHECK_SECONDS = 1.0
#: A heartbeat older than this many tail intervals (and `_MIN_STALE` seconds) means the tail left.
_STALE_INTERVALS = 3
_MIN_STALE = 5.0
#: Schema metadata key: the seq of the next part of the live file's (rank, segment); its rows are
#: in no part numbered below it, so a tail takes them only once it has read every such part.
_NEXT_SEQ = b"spikedoc.next_seq"
_SEGMENT = b"spikedoc.segment"


def live_path(run_dir: Path, table: str, rank: int) -> Path:
    """`live/steps-rank=0.parquet`: the live file of one table and rank."""
    return Path(run_dir) / LIVE_DIR / f"{table}-rank={rank}.parquet"


def announce(run_dir: str | os.PathLike[str], interval: float) -> bool:
    """Tell the writers of `run_dir` that a tail polls every `interval` seconds; False where the run
    directory cannot be written (the tail then sees rows as parts land)."""
    folder = Path(run_dir) / LIVE_DIR
    try:
        folder.mkdir(exist_ok=True)
        # Several tails may announce at once: each through its own temporary name.
        write_whole(folder / HEARTBEAT, f"{interval:g}\n", temporary=folder / f".{HEARTBEAT}.{os.getpid()}.tmp")
    except OSError:
        return False
    return True


class LiveWriter:
    """The writer's side: whether a tail is attached, and the live files of one rank.

    Example:
        >>> live = LiveWriter(tempfile.mkdtemp(), rank=0)  # doctest: +SKIP
        >>> live.due()  # doctest: +SKIP
        False
    """

    def __init__(self, run_dir: str | os.PathLike[str], rank: int) -> None:
        self.run_dir, self.rank = Path(run_dir), rank
        self.interval: float | None = None
        """The attached tail's interval (seconds); None when no tail is attached."""
        self._last_look = self._last_write = -float("inf")

    @property
    def period(self) -> float:
        """Seconds the writer thread may sleep before it looks again."""
        return CHECK_SECONDS if self.interval is None else min(CHECK_SECONDS, self.interval)

    def due(self) -> bool:
        """Whether the live files should be rewritten now (a tail is attached and an interval has passed)."""
        now = time.monotonic()
        if now - self._last_look >= CHECK_SECONDS or self.interval is not None:
            self._last_look = now
            self.interval = self._attached_interval()
        return self.interval is not None and now - self._last_write >= self.interval

    def write(self, steps: pa.Table | None, events: pa.Table | None, *, segment: int, next_seq: int) -> None:
        """Replace the live files atomically with these rows (None or empty: no rows buffered)."""
        self._last_write = time.monotonic()
        meta = {_NEXT_SEQ: str(next_seq).encode(), _SEGMENT: str(segment).encode()}
        for table, data in ((STEPS, steps), (EVENTS, events)):
            path = live_path(self.run_dir, table, self.rank)
            if data is None:
                data = pa.table({"step": pa.array([], pa.int64())})
            path.parent.mkdir(exist_ok=True)
            write_parquet_whole(data.replace_schema_metadata({**(data.schema.metadata or {}), **meta}), path)

    def clear(self) -> None:
        """Remove this rank's live files and their temporaries (at open: left by a killed writer; at
        close: every row is in a part)."""
        for table in (STEPS, EVENTS):
            path = live_path(self.run_dir, table, self.rank)
            for stale in (path, temporary_of(path)):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _attached_interval(self) -> float | None:
        path = self.run_dir / LIVE_DIR / HEARTBEAT
        try:
            age = time.time() - path.stat().st_mtime
            interval = float(path.read_text().strip())
        except (OSError, ValueError):
            return None
        if not interval > 0 or age > max(_MIN_STALE, _STALE_INTERVALS * interval):
            return None
        return interval


class LiveFile:
    """A live file as a tail reads it: its rows, and from which part on they are not in a part yet."""

    def __init__(self, table: pa.Table, segment: int, next_seq: int) -> None:
        self.table, self.segment, self.next_seq = table, segment, next_seq


def read_live(run_dir: Path, table: str, rank: int) -> LiveFile | None:
    """The live file of one table and rank; None when there is none (no tail was announced, the
    writer closed) or it is not one (a file spikedoc did not write)."""
    path = live_path(run_dir, table, rank)
    try:
        data = pq.read_table(path)
        meta = data.schema.metadata or {}
        return LiveFile(data, int(meta[_SEGMENT]), int(meta[_NEXT_SEQ]))
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
