"""Background writer of a run directory: Parquet part files written off the training thread."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from spikedoc.store._files import parts_on_disk, temporary_of, warm_up, write_parquet_whole, write_whole
from spikedoc.store._tables import TableBuilder
from spikedoc.store.live import LiveWriter
from spikedoc.store.schema import EVENTS, FORMAT_VERSION, LAYERS, META_FILE, STEPS, partition_dir

__all__ = ["RunWriter"]

logger = logging.getLogger(__name__)

#: A flush is also forced once this many rows are pending, so one part stays a few MB even for
#: models with thousands of tensors (2**18 layer rows is ~10 MB of Arrow buffers).
_PART_ROWS = 1 << 18
#: Seconds close() waits for the last write, so a hung filesystem cannot hang interpreter exit.
_CLOSE_TIMEOUT = 60.0

_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()


class RunWriter:
    """Buffers rows of the step, layer and event tables and writes them as Parquet parts.

    The layout, column types and the reasons for the defaults are in docs/run-format.md.

    A daemon thread writes `steps/rank=R/part-<segment>-<seq>.parquet` (and the same under
    `layers/` and `events/`) whenever `flush_every` step rows are buffered, `flush_seconds`
    have passed, or on `flush()`/`close()`. Each part goes to a hidden temporary name first and is
    renamed when complete, so a kill at any moment leaves only whole parts; `open()` removes the
    temporaries a killed writer of the same rank left. While a `spikedoc tail` is attached, the
    rows not yet in a part are also kept in a live file (`spikedoc.store.live`). Nothing here
    raises into the training loop: failures are logged once and counted in `dropped_rows`.

    Args:
        run_dir: The run directory (created if missing).
        rank: Distributed rank; selects the `rank=R` partition. Only rank 0 writes `meta.json`.
        flush_every: Step rows per part (the most a kill loses when steps are fast).
        flush_seconds: Longest time rows stay buffered (the most a kill loses when steps are slow).
        max_pending_rows: Rows (of all tables) buffered at most (~100 MB at the default for
            AdamW layer rows); beyond it rows are dropped and counted, so a stuck filesystem
            cannot grow memory without bound.
        row_group_steps: Logged steps per Parquet row group of the layer table; row-group
            statistics on `step` let a reader skip all groups outside a requested window.

    Example:
        >>> import numpy as np, tempfile
        >>> writer = RunWriter(tempfile.mkdtemp())
        >>> writer.open({"model": "tiny"})
        0
        >>> writer.add_step({"step": 0, "loss": 2.3, "grad_norm": 1.1})
        >>> writer.add_layers({"step": np.array([0, 0]), "name": ["w", "b"],
        ...                    "grad_norm": np.array([1.0, 0.5], dtype=np.float32)})
        >>> writer.add_event("checkpoint", 0, path="ckpt-0.pt")
        >>> writer.close()
        >>> writer.dropped_rows
        0
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        rank: int = 0,
        flush_every: int = 100,
        flush_seconds: float = 30.0,
        max_pending_rows: int = 1_000_000,
        row_group_steps: int = 256,
        mirror: Any = None,
    ) -> None:
        for option, value in [("rank", rank), ("flush_every", flush_every), ("max_pending_rows", max_pending_rows),
                              ("row_group_steps", row_group_steps)]:  # fmt: skip
            if not isinstance(value, (int, np.integer)) or value < (0 if option == "rank" else 1):
                raise ValueError(
                    f"RunWriter: {option} must be an integer >= {0 if option == 'rank' else 1}, got {value!r}"
                )
        if not flush_seconds > 0:
            raise ValueError(f"RunWriter: flush_seconds must be > 0, got {flush_seconds!r}")
        self.run_dir = Path(run_dir)
        self.mirror = mirror
        """Called as `mirror(table, items)` on the writer thread after each batch of parts is written
        (e.g. a `TensorBoardMirror`); a failure disables it with one warning, the Parquet run goes on."""
        self.rank = int(rank)
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self.max_pending_rows = int(max_pending_rows)
        self.row_group_steps = int(row_group_steps)
        self.segment = 0
        self._cond = threading.Condition()
        # Rows accumulate in _batch; at flush_every steps (or flush()/time/close) the batch is cut
        # into _ready for the thread, so each part holds exactly one batch whatever the thread's pace.
        self._batch: dict[str, list[Any]] = {STEPS: [], LAYERS: [], EVENTS: []}
        self._batch_rows = self._batch_steps = 0
        self._ready: list[tuple[dict[str, list[Any]], int]] = []
        self._pending_rows = self._dropped = 0  # pending: buffered, ready or being written
        self._closing = self._closed = False
        self._thread: threading.Thread | None = None
        self._meta: dict[str, Any] | None = None  # set while meta.json still has to be written
        self._seq: int | None = None  # seq of the next batch's parts
        self._tables = TableBuilder(warn=self._warn, drop=self._drop)
        self._warned: set[str] = set()
        self._live = LiveWriter(self.run_dir, self.rank)

    @property
    def dropped_rows(self) -> int:
        """Rows lost to write errors, bad blocks, a full queue or use after close()."""
        return self._dropped

    @property
    def pending_rows(self) -> int:
        """Rows buffered or waiting to be written (a producer can wait for the backlog to drain)."""
        return self._pending_rows

    # ----------------------------------------------------------------------------- training side

    def open(self, meta: dict[str, Any]) -> int:
        """Create the run directory, write `meta.json` and start the writer thread.

        When `run_dir` already holds a run, its metadata is merged with `meta` and a new segment is
        appended. `meta["segment"]` may force the number (distributed runs agree on it first).

        Args:
            meta: JSON-able run metadata; `start_time` and `start_step` go into the segment entry.

        Returns:
            The segment number: 0 for a new run, last segment + 1 when appending.
        """
        meta = dict(meta)
        forced = meta.pop("segment", None)
        old = self._read_old_meta()
        if isinstance(old.get("format_version"), int) and old["format_version"] > FORMAT_VERSION:
            # Appending version-1 parts to a newer run would mislabel it; record nothing instead.
            self._closed = True
            self._warn("newer", f"run format {old['format_version']} is newer than {FORMAT_VERSION}; not appending")
            return -1
        segments = [s for s in old.get("segments", []) if isinstance(s, dict)]
        self.segment = int(forced) if forced is not None else self._next_segment(old)
        entry = {"segment": self.segment, "start_time": meta.get("start_time", time.time())}
        if "start_step" in meta:
            entry["start_step"] = meta["start_step"]
        self._clean_leftovers()
        if self.rank == 0:  # one meta.json per run; other ranks only write their partitions
            self._meta = {**old, **meta, "format_version": FORMAT_VERSION, "segments": [*segments, entry]}
            self._write_meta()
        warm_up()
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._loop, name=f"spikedoc-writer-{self.rank}", daemon=True)
            self._thread.start()
            _OPEN_WRITERS.add(self)
        return self.segment

    def _clean_leftovers(self) -> None:
        """Remove what a killed writer of this rank left half-written: part and meta temporaries, live files."""
        stale = [p for t in (STEPS, LAYERS, EVENTS) if self._folder(t).is_dir() for p in self._folder(t).glob(".part-*.tmp")]
        if self.rank == 0:
            stale.append(temporary_of(self.run_dir / META_FILE))
        for path in stale:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._warn("leftover", f"could not remove the leftover {path} ({exc})")
        self._live.clear()

    def next_segment(self) -> int:
        """The segment `open()` would pick now: 0 for a new run, else 1 + the largest known."""
        return self._next_segment(self._read_old_meta())

    def _next_segment(self, old: dict[str, Any]) -> int:
        segments = [s for s in old.get("segments", []) if isinstance(s, dict)]
        on_disk = [seg for seg, _ in parts_on_disk(self._folder(STEPS))]
        known = [int(s.get("segment", -1)) for s in segments] + on_disk
        return max(known, default=-1) + 1

    def add_step(self, row: dict[str, Any]) -> None:
        """Buffer one step-table row (scalars; lists for `sample_ids`/`sample_losses`)."""
        try:
            row = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else v for k, v in row.items()}
            row.setdefault("segment", self.segment)
            row.setdefault("time", time.time())
            self._enqueue(STEPS, row, 1)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self._drop(1, "bad_step", f"could not buffer a step row ({exc!r})")

    def add_layers(self, columns: dict[str, Any]) -> None:
        """Buffer a columnar block of layer rows: equal-length arrays/lists keyed by column name."""
        n = 0
        try:
            block = {k: list(v) if k == "name" else np.array(v, copy=True) for k, v in columns.items()}
            n = len(block.get("step", ()))
            if "name" not in block or "step" not in block:
                raise ValueError("a layer block needs 'step' and 'name' columns")
            if any(len(v) != n for v in block.values()):
                raise ValueError("columns have different lengths: " + str({k: len(v) for k, v in block.items()}))
            if "segment" not in block:
                block["segment"] = np.full(n, self.segment, dtype=np.int32)
            self._enqueue(LAYERS, block, n)
        except Exception as exc:  # noqa: BLE001
            self._drop(n, "bad_layers", f"could not buffer a layer block ({exc!r})")

    def add_event(self, kind: str, step: int, **detail: Any) -> None:
        """Buffer one event; `detail` is stored as a JSON object string."""
        try:
            row = {"step": step, "segment": self.segment, "time": time.time(), "kind": str(kind),
                   "detail": json.dumps(detail, default=str)}  # fmt: skip
            self._enqueue(EVENTS, row, 1)
        except Exception as exc:  # noqa: BLE001
            self._drop(1, "bad_event", f"could not buffer event {kind!r} ({exc!r})")

    def flush(self) -> None:
        """Ask the writer thread to write everything buffered now; returns without waiting."""
        with self._cond:
            self._cut()
            self._cond.notify()

    def close(self) -> None:
        """Write everything buffered and stop the thread. Idempotent; called at interpreter exit."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(_CLOSE_TIMEOUT)
            if self._thread.is_alive():
                self._warn("close_timeout", f"writer thread still busy after {_CLOSE_TIMEOUT:.0f}s; rows may be lost")
        else:
            self._drop(self._pending_rows, "never_opened", "close() before open(): buffered rows were not written")
        _OPEN_WRITERS.discard(self)
        if not (self._thread is not None and self._thread.is_alive()):
            self._live.clear()  # every row is in a part now
        if self.mirror is not None and hasattr(self.mirror, "close"):
            try:
                self.mirror.close()
            except Exception as exc:  # noqa: BLE001
                self._warn("mirror", f"closing the live mirror failed ({exc!r})")
        if self._dropped:
            logger.warning("spikedoc: %d rows of %s could not be written", self._dropped, self.run_dir)

    def _enqueue(self, table: str, item: Any, rows: int) -> None:
        with self._cond:
            if self._closed:
                self._drop(rows, "closed", "rows added after close() are dropped")
                return
            if self._pending_rows + rows > self.max_pending_rows:
                self._drop(
                    rows, "queue_full", f"more than {self.max_pending_rows} rows waiting to be written; dropping"
                )
                return
            # Cut before the step row that starts the next batch, not after the last one, so the
            # layer rows and events that follow a step row land in the same part number.
            if table == STEPS and self._batch_steps >= self.flush_every or self._batch_rows >= _PART_ROWS:
                self._cut()
                self._cond.notify()
            self._batch[table].append(item)
            self._pending_rows += rows
            self._batch_rows += rows
            self._batch_steps += table == STEPS

    def _cut(self) -> None:
        """Hand the current batch to the thread (caller holds the lock)."""
        if self._batch_rows:
            self._ready.append((self._batch, self._batch_rows))
            self._batch = {STEPS: [], LAYERS: [], EVENTS: []}
            self._batch_rows = self._batch_steps = 0

    def _drop(self, rows: int, key: str, reason: str) -> None:
        with self._cond:  # re-entrant: also called from _enqueue, which holds it
            self._dropped += rows
        self._warn(key, reason)

    def _warn(self, key: str, reason: str) -> None:
        # Once per kind of problem: a broken disk must not flood the training log every flush.
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("spikedoc: logging to %s: %s (training continues)", self.run_dir, reason)

    # ------------------------------------------------------------------------------ writer side

    def _loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._cond:
                while not (self._ready or self._closing):
                    left = last + self.flush_seconds - time.monotonic()
                    if left <= 0:
                        self._cut()
                        last, left = time.monotonic(), self.flush_seconds
                        continue
                    if self._cond.wait(min(left, self._live.period)) or self._ready or self._closing:
                        continue
                    break  # a look for a tail is due (the stat is made outside the lock)
                if self._closing:
                    self._cut()
                ready, self._ready, closing = self._ready, [], self._closing
            for batch, rows in ready:
                self._write_batch(batch)
                with self._cond:
                    self._pending_rows -= rows
            if ready:
                last = time.monotonic()
            if closing:
                return
            if self._live.due():
                self._write_live()

    def _write_live(self) -> None:
        """The rows not in a part yet, for an attached tail; after the parts, so none is skipped."""
        with self._cond:
            steps, events = list(self._batch[STEPS]), list(self._batch[EVENTS])
        if self._seq is None:
            self._seq = self._first_seq()
        try:
            self._live.write(self._tables.steps(steps) if steps else None, self._tables.events(events) if events else None,
                             segment=self.segment, next_seq=self._seq)
        except Exception as exc:  # noqa: BLE001 - the live view is a convenience: the parts go on
            self._warn("live", f"could not write the live view for spikedoc tail ({exc!r})")

    def _write_batch(self, batch: dict[str, list[Any]]) -> None:
        if self._meta is not None:
            self._write_meta()  # retried: the directory may have become writable
        if self._seq is None:
            self._seq = self._first_seq()
        seq, self._seq = self._seq, self._seq + 1  # one seq per batch: a step's rows share it in every table
        builders = {STEPS: self._tables.steps, LAYERS: self._tables.layers, EVENTS: self._tables.events}
        for table, items in batch.items():
            if not items:
                continue
            try:
                data = builders[table](items)
            except Exception as exc:  # noqa: BLE001
                rows = sum(len(it["name"]) for it in items) if table == LAYERS else len(items)
                self._drop(rows, f"build_{table}", f"could not convert {table} rows to Arrow ({exc!r})")
                continue
            if data is not None:
                self._write_part(table, data, seq)
        self._mirror(batch)

    def _first_seq(self) -> int:
        """The seq after the parts an earlier process wrote for this segment, in any table."""
        found = [q for t in (STEPS, LAYERS, EVENTS) for seg, q in parts_on_disk(self._folder(t)) if seg == self.segment]
        return max(found, default=-1) + 1

    def _mirror(self, batch: dict[str, list[Any]]) -> None:
        if self.mirror is None:
            return
        try:
            for table, items in batch.items():
                if items and table in (STEPS, LAYERS):
                    self.mirror(table, items)
        except Exception as exc:  # noqa: BLE001
            self.mirror = None
            self._warn("mirror", f"the live mirror failed and is off for the rest of the run ({exc!r})")

    def _folder(self, table: str) -> Path:
        return self.run_dir / partition_dir(table, self.rank)

    def _write_part(self, table: str, data: pa.Table, seq: int) -> None:
        folder = self._folder(table)
        group = None
        if table == LAYERS:  # ~row_group_steps logged steps per row group
            group = self.row_group_steps * max(1, data.num_rows // max(1, len(data["step"].unique())))
        strings = [f.name for f in data.schema if pa.types.is_string(f.type)]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_parquet_whole(data, folder / f"part-{self.segment}-{seq:06d}.parquet", compression="zstd",
                                use_dictionary=strings, row_group_size=group)
        except Exception as exc:  # noqa: BLE001 - disk full, unwritable dir, ...
            self._drop(data.num_rows, "write", f"could not write {folder}: {exc}")

    def _write_meta(self) -> None:
        path = self.run_dir / META_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_whole(path, json.dumps(self._meta, indent=2, default=str))
            self._meta = None
        except Exception as exc:  # noqa: BLE001
            self._warn("write", f"could not write {path}: {exc}; retrying at every flush")

    def _read_old_meta(self) -> dict[str, Any]:
        path = self.run_dir / META_FILE
        try:
            old = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as exc:
            self._warn("old_meta", f"existing {path} is unreadable ({exc}); it will be replaced")
            return {}
        return old if isinstance(old, dict) else {}


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        writer.close()
