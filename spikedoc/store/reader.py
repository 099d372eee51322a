"""Read a run: the step and event tables whole, the layer table only for the step windows asked for."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from spikedoc.errors import RunFormatError, RunNotFoundError, UnsupportedVersionError
from spikedoc.store.schema import EVENT_COLUMNS, EVENTS, FORMAT_VERSION, LAYERS, META_FILE, STEPS

__all__ = ["Run", "load"]

logger = logging.getLogger(__name__)

_RANK_DIR = re.compile(r"rank=(\d+)")
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")
_LAYOUT = (
    "a spikedoc run directory holds meta.json and steps/rank=N/part-*.parquet; "
    "spikedoc also reads a .csv file (step,loss,...) or a TensorBoard log dir (events.out.tfevents.*)"
)
_FORMAT = ds.ParquetFileFormat()
_LOCAL = pafs.LocalFileSystem()


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
        warnings: What was skipped while loading, each naming the file.
        layer_scan: Files and Parquet row groups the last `layers()` call read, against the total.

    Example:
        >>> run = load("runs/exp1")  # doctest: +SKIP
        >>> run.steps[["step", "loss", "grad_norm"]].tail()  # doctest: +SKIP
        >>> run.layers(start=4_900, stop=5_000, names=["head.weight"])  # doctest: +SKIP
    """

    path: Path
    source: str
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    steps: pd.DataFrame = field(repr=False)
    events: pd.DataFrame = field(repr=False, default_factory=lambda: _empty((*EVENT_COLUMNS, "rank")))
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layer_scan: dict[str, int] = field(default_factory=dict, repr=False)
    _layer_parts: list[tuple[Path, int]] = field(default_factory=list, repr=False)
    _fragments: dict[Path, ds.Fragment] = field(default_factory=dict, repr=False)

    @property
    def has_layers(self) -> bool:
        """Whether the run has a layer table at all (imported runs never do)."""
        return bool(self._layer_parts)

    def layers(
        self,
        start: int | None = None,
        stop: int | None = None,
        names: Iterable[str] | None = None,
        *,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Layer rows with `start <= step <= stop` (either bound may be None) and `name` in `names`.

        Only the row groups whose Parquet statistics overlap the window are read, so a window of
        a few hundred steps costs the same on a 30M-row table as on a small one.

        Args:
            start: First step, inclusive.
            stop: Last step, inclusive.
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
        expr = None
        for part in (
            pc.field("step") >= start if start is not None else None,
            pc.field("step") <= stop if stop is not None else None,
            pc.field("name").isin(list(names)) if names is not None else None,
        ):
            if part is not None:
                expr = part if expr is None else expr & part
        tables, groups_read, groups_total, files = [], 0, 0, 0
        for path, rank in self._layer_parts:
            try:
                fragment = self._fragment(path)
                groups = fragment.split_by_row_group(expr) if expr is not None else [fragment]
                groups_total += fragment.num_row_groups
                got = [g.to_table(filter=expr, columns=_wanted(g, columns)) for g in groups]
            except (pa.ArrowException, OSError) as exc:
                self._skip(path, exc)
                continue
            groups_read += len(groups) if expr is not None else fragment.num_row_groups
            files += bool(groups)
            tables += [
                _decoded(t).append_column("rank", pa.array([rank] * t.num_rows, pa.int64())) for t in got if t.num_rows
            ]
        self.layer_scan = {"files": files, "row_groups": groups_read, "row_groups_total": groups_total}
        if not tables:
            return _empty(("step", "segment", "name", "rank"))
        frame = _to_pandas(pa.concat_tables(tables, promote_options="permissive"))
        return _sorted(frame, ["rank", "segment", "step", "name"])

    def _fragment(self, path: Path) -> ds.Fragment:
        # Cached so that footers are read once per Run, not once per window.
        if path not in self._fragments:
            fragment = _FORMAT.make_fragment(str(path), _LOCAL)
            fragment.ensure_complete_metadata()
            self._fragments[path] = fragment
        return self._fragments[path]

    def _skip(self, path: Path, exc: BaseException) -> None:
        message = f"skipped unreadable part {path}: {_one_line(exc)}"
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("spikedoc: %s", message)


def load(path: str | Path) -> Run:
    """Load a spikedoc run directory, a CSV log or a TensorBoard log directory.

    Args:
        path: A run directory (holds `meta.json`), a `.csv` file, or a directory holding
            `events.out.tfevents.*` files anywhere below it.

    Returns:
        The run; `run.missing` lists what the source lacks for analysis.

    Raises:
        RunNotFoundError: The path does not exist or holds nothing spikedoc reads.
        RunFormatError: meta.json or the Parquet parts are malformed beyond skipping.
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
            return importers.read_csv(path)
        if path.name.startswith("events.out.tfevents."):
            return importers.read_tensorboard(path)
        raise RunNotFoundError(f"{path} is not a run: {_LAYOUT}")
    if (path / META_FILE).exists():
        return _load_spikedoc(path)
    if next(path.rglob("events.out.tfevents.*"), None) is not None:
        return importers.read_tensorboard(path)
    what = "an empty directory" if next(path.iterdir(), None) is None else "not a run"
    raise RunNotFoundError(f"{path} is {what}: {_LAYOUT}")


def _load_spikedoc(path: Path) -> Run:
    meta = _read_meta(path / META_FILE)
    run = Run(path=path, source="spikedoc", meta=meta, steps=_empty(("step", "segment", "rank")))
    steps = _read_table(run, STEPS)
    if steps is None:
        raise RunFormatError(f"{path} has no step rows: the run ended before its first flush ({_LAYOUT})")
    if "step" not in steps.columns:
        raise RunFormatError(f"{path}/{STEPS} lacks the required column 'step' (columns: {', '.join(steps.columns)})")
    run.steps = _sorted(steps, ["rank", "segment", "step"])
    events = _read_table(run, EVENTS)
    run.events = _empty((*EVENT_COLUMNS, "rank")) if events is None else _sorted(events, ["rank", "segment", "step"])
    run._layer_parts = _parts(path / LAYERS)
    if not run.has_layers:
        run.missing.append("layers")
    return run


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFormatError(f"{path} is not readable JSON: {_one_line(exc)}") from None
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


def _parts(table_dir: Path) -> list[tuple[Path, int]]:
    """Complete part files of a table with their rank, in write order; temp files are ignored."""
    found = []
    for rank_dir in table_dir.iterdir() if table_dir.is_dir() else []:
        match = _RANK_DIR.fullmatch(rank_dir.name)
        if not (match and rank_dir.is_dir()):
            continue
        for part in rank_dir.iterdir():
            name = _PART.fullmatch(part.name)
            if name:
                found.append(((int(match[1]), int(name[1]), int(name[2])), part))
    return [(part, key[0]) for key, part in sorted(found)]


def _read_table(run: Run, table: str) -> pd.DataFrame | None:
    """All parts of a small table concatenated, skipping unreadable ones; None when none exist."""
    parts = _parts(run.path / table)
    if not parts:
        return None
    try:  # fast path: one multi-threaded scan (2x faster than a loop on thousands of parts)
        return _to_pandas(_scan(run.path / table, parts))
    except (pa.ArrowException, OSError):
        pass  # some part is unreadable: read them one by one to name it
    tables = []
    for path, rank in parts:
        try:
            data = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            run._skip(path, exc)
            continue
        tables.append(data.append_column("rank", pa.array([rank] * data.num_rows, pa.int64())))
    if not tables:
        raise RunFormatError(f"{run.path}/{table}: none of its {len(parts)} part files is readable: {run.warnings[-1]}")
    try:
        data = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException:  # e.g. a column that changed type between segments: let pandas unify
        return pd.concat([_to_pandas(t) for t in tables], ignore_index=True)
    return _to_pandas(data)


def _scan(table_dir: Path, parts: list[tuple[Path, int]]) -> pa.Table:
    options = ds.FileSystemFactoryOptions(
        partition_base_dir=str(table_dir),
        partitioning=ds.partitioning(pa.schema([("rank", pa.int64())]), flavor="hive"),
    )
    factory = ds.FileSystemDatasetFactory(_LOCAL, [str(p) for p, _ in parts], _FORMAT, options)
    schema = factory.inspect(promote_options="permissive")  # parts may differ in optional columns
    return factory.finish(schema).to_table()


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary columns as plain values, so parts written with and without them concatenate."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
    return table


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    if "segment" not in frame.columns:
        frame["segment"] = 0
    return frame


def _sorted(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    keys = [k for k in keys if k in frame.columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _wanted(fragment: ds.Fragment, columns: Iterable[str] | None) -> list[str] | None:
    if columns is None:
        return None
    present = set(fragment.physical_schema.names)
    return [c for c in dict.fromkeys(["step", "segment", "name", *columns]) if c in present]


def _empty(columns: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
