"""A loaded run: metadata, the step and event tables, and windowed access to the layer table."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spikedoc.errors import one_line
from spikedoc.store.schema import EVENT_COLUMNS
from spikedoc.store.validate import Hole, check_fits

__all__ = ["Run", "decoded", "empty", "is_sorted", "sorted_frame", "to_pandas"]

logger = logging.getLogger("spikedoc.store.reader")

# Step range of a row group whose statistics are missing: it may hold any step.
_ANY_STEP = (np.iinfo(np.int64).min, np.iinfo(np.int64).max)


@dataclass(kw_only=True, eq=False)
class Run:
    """A loaded run: metadata, the step and event tables, and windowed access to the layer table.

    Attributes:
        path: Where the run was read from.
        source: `"spikedoc"`, `"csv"` or `"tensorboard"`.
        meta: `meta.json` (spikedoc runs) or what an importer knows about the source.
        steps: One row per (rank, segment, step), sorted so; always has `step`, `segment`, `rank`.
        events: `step`, `segment`, `time`, `kind`, `detail` (a JSON string) and `rank`.
        missing: What this source lacks for analysis, e.g. `["layers", "grad_norm"]`.
        warnings: What was skipped, each naming the file: unreadable parts of the step and event
            tables and layer parts cut short (at load), layer parts that fail when `layers()`
            reads them (then).
        layer_scan: Files and Parquet row groups the last `layers()` call read, against the total.
        holes: Steps the run should hold and does not (an unreadable part, steps missing from a
            log), each with its step range; a run with holes is incomplete.

    Example:
        >>> run = spikedoc.load("runs/exp1")  # doctest: +SKIP
        >>> run.steps[["step", "loss", "grad_norm"]].tail()  # doctest: +SKIP
        >>> run.layers(first_step=4_900, last_step=5_000, names=["head.weight"])  # doctest: +SKIP
    """

    path: Path
    source: str
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    steps: pd.DataFrame = field(repr=False)
    events: pd.DataFrame = field(repr=False, default_factory=lambda: empty((*EVENT_COLUMNS, "rank")))
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layer_scan: dict[str, int] = field(default_factory=dict, repr=False)
    holes: list[Hole] = field(default_factory=list)
    _layer_parts: list[tuple[Path, int]] = field(default_factory=list, repr=False)
    _row_groups: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_layers(self) -> bool:
        """Whether the run has a layer table at all (imported runs never do)."""
        return bool(self._layer_parts)

    @property
    def layer_bytes(self) -> int:
        """Uncompressed bytes of the whole layer table (from its footers; nothing is read)."""
        return int(self._index()[:, 4].sum()) if self._layer_parts else 0

    def layers(
        self,
        first_step: int | None = None,
        last_step: int | None = None,
        names: Iterable[str] | None = None,
        *,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Layer rows with `first_step <= step <= last_step` (both bounds included; either may be
        None) and `name` in `names`.

        Only the row groups whose Parquet statistics overlap the window are read, so a window of
        a few hundred steps costs the same on a 30M-row table as on a small one.

        Args:
            first_step: First step read (included).
            last_step: Last step read (included, unlike Python's `range` stop).
            names: Parameter names to keep (all when None).
            columns: Measurement columns to read besides `step`, `segment`, `name` (all when None).

        Returns:
            Long format, one row per (rank, segment, step, name), sorted so, with a `rank` column.

        Example:
            >>> window = run.layers(4_900, 5_000, names=["head.weight"])  # doctest: +SKIP
            >>> window.pivot_table(index="step", columns="name", values="grad_norm")  # doctest: +SKIP
        """
        if isinstance(names, str):
            names = [names]
        names = None if names is None else list(names)
        lo = first_step if first_step is not None else _ANY_STEP[0]
        hi = last_step if last_step is not None else _ANY_STEP[1]
        index = self._index()
        hit = index[(index[:, 2] <= hi) & (index[:, 3] >= lo)]  # rows in part order, so are the hits
        check_fits(int(hit[:, 4].sum()), what=f"the layer rows asked for (steps {lo}..{hi}) of {self.path}")
        parts, first = np.unique(hit[:, 0], return_index=True)
        tables, groups_read, files = [], 0, 0
        for part_index, groups in zip(parts.tolist(), np.split(hit[:, 1], first[1:])):
            path, rank = self._layer_parts[part_index]
            try:
                with pq.ParquetFile(path) as part:
                    data = part.read_row_groups(groups.tolist(), columns=_wanted(part.schema_arrow.names, columns))
            except (pa.ArrowException, OSError) as exc:
                self._skip(path, exc)
                continue
            groups_read += len(groups)
            files += 1
            data = decoded(data)
            keep = _window_mask(data, first_step, last_step, names)
            if keep is not None:
                data = data.filter(keep)
            if data.num_rows:
                tables.append(data.append_column("rank", pa.array(np.full(data.num_rows, rank, dtype=np.int64))))
        groups_total = len(index)
        self.layer_scan = {"files": files, "row_groups": groups_read, "row_groups_total": groups_total}
        if not tables:
            return empty(("step", "segment", "name", "rank"))
        frame = to_pandas(pa.concat_tables(tables, promote_options="permissive"))
        return sorted_frame(frame, ["rank", "segment", "step", "name"])

    def _index(self) -> np.ndarray:
        """Every readable layer row group as (part number, row group, min step, max step, data bytes).

        Built from the footers on the first call and kept as four integers per row group: caching
        the parsed footers themselves costs ~40 kB per part, 400 MB for the 10,000 parts of a
        million-step run, and one array makes each later window a vectorized selection. The bytes
        (uncompressed) let a window that would not fit in memory be refused before it is read.
        """
        if self._row_groups is None:
            rows = [np.empty((0, 5), dtype=np.int64)]
            for i, (path, _) in enumerate(self._layer_parts):
                try:
                    meta = pq.read_metadata(path)
                except (pa.ArrowException, OSError) as exc:
                    self._skip(path, exc)
                    continue
                n = meta.num_row_groups
                sizes = [meta.row_group(g).total_byte_size for g in range(n)]
                rows.append(np.column_stack([np.full(n, i), np.arange(n), _step_ranges(meta), sizes]).astype(np.int64))
            self._row_groups = np.concatenate(rows)
        return self._row_groups

    def _skip(self, path: Path, reason: BaseException | str) -> None:
        message = f"skipped unreadable part {path}: {one_line(reason)}"
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("spikedoc: %s", message)


def _step_ranges(meta: pq.FileMetaData) -> np.ndarray:
    """(min, max) of the `step` column per row group; the widest range where statistics are missing."""
    names = meta.schema.names
    column = names.index("step") if "step" in names else None
    ranges = np.empty((meta.num_row_groups, 2), dtype=np.int64)
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics if column is not None else None
        ok = stats is not None and stats.has_min_max and isinstance(stats.min, int)
        ranges[g] = (stats.min, stats.max) if ok else _ANY_STEP
    return ranges



def _window_mask(data: pa.Table, first_step: int | None, last_step: int | None, names: list[str] | None) -> pa.Array | None:
    """Rows of a layer table inside the window (None: all of them)."""
    mask = None
    for part in (
        pc.greater_equal(data["step"], first_step) if first_step is not None else None,
        pc.less_equal(data["step"], last_step) if last_step is not None else None,
        pc.is_in(data["name"], value_set=pa.array(names, pa.string())) if names is not None else None,
    ):
        if part is not None:
            mask = part if mask is None else pc.and_(mask, part)
    return mask



def decoded(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain values, so parts written with and without them concatenate."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table



def to_pandas(table: pa.Table, *, self_destruct: bool = False) -> pd.DataFrame:
    # self_destruct: the table is not used afterwards, so each column is freed once converted.
    frame = table.to_pandas(split_blocks=self_destruct, self_destruct=self_destruct)
    if "segment" not in frame.columns:
        frame["segment"] = 0
    return frame



def sorted_frame(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    keys = [k for k in keys if k in frame.columns]
    if is_sorted(frame, keys):  # the usual case: parts in write order; skip the copy of a big table
        return frame.reset_index(drop=True)
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)



def is_sorted(frame: pd.DataFrame, keys: list[str]) -> bool:
    """Rows are in ascending lexicographic order of `keys` (numeric keys without NaN only)."""
    if len(frame) < 2:
        return True
    ordered = np.ones(len(frame) - 1, dtype=bool)  # row i <= row i + 1 on the keys seen so far
    for key in reversed(keys):
        column = frame[key]
        if not pd.api.types.is_numeric_dtype(column) or column.isna().any():
            return False
        values = column.to_numpy()
        ordered = (values[1:] > values[:-1]) | ((values[1:] == values[:-1]) & ordered)
    return bool(ordered.all())



def _wanted(present: list[str], columns: Iterable[str] | None) -> list[str] | None:
    if columns is None:
        return None
    return [c for c in dict.fromkeys(["step", "segment", "name", *columns]) if c in present]



def empty(columns: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
