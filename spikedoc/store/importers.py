"""Import runs logged by other tools (CSV files, TensorBoard event files) as step tables."""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.errors import RunFormatError, RunNotFoundError, one_line
from spikedoc.store.run import Run
from spikedoc.store.validate import JUDGED, check_fits, find_holes, numbers

__all__ = ["ALIASES", "read_csv", "read_tensorboard"]

logger = logging.getLogger(__name__)

#: Canonical column <- the names other tools log it under, in priority order: when several are
#: present the first one wins and the others are kept under their sanitized names.
#: Matching ignores case and surrounding spaces (documented in docs/run-format.md).
ALIASES: dict[str, tuple[str, ...]] = {
    "step": ("step", "global_step", "train/global_step", "trainer/global_step", "iteration", "iter",
             "iters", "steps", "_step"),
    "loss": ("loss", "train/loss", "train_loss", "training_loss", "train/lm_loss", "lm loss", "lm_loss",
             "lm-loss", "lm-loss-training/lm loss", "loss/train"),
    "grad_norm": ("grad_norm", "train/grad_norm", "grad-norm", "grad-norm/grad-norm", "gradnorm", "grad norm",
                  "norm", "global_grad_norm", "train/gradient_norm"),
    "lr": ("lr", "learning_rate", "train/learning_rate", "learning-rate", "learning-rate/learning-rate",
           "learning rate", "train/lr", "lr-adamw", "lr/group0"),
    "loss_scale": ("loss_scale", "loss-scale", "loss-scale/loss-scale", "loss scale", "train/loss_scale"),
}  # fmt: skip
#: What no importable source has: the per-tensor table, batch fingerprints, checkpoint events.
_NEVER_IMPORTED = ["layers", "batch fingerprints", "events"]
_ANALYSED = ("loss", "grad_norm", "lr")
#: Largest step accepted: float64, which a CSV column of numbers may be read as, holds every whole
#: number up to 2^53 exactly; a real run is many orders of magnitude below it.
_MAX_STEP = 2**53
#: A log in file order steps back only at resumes; more often than once per this many rows, the
#: rows are shuffled (a random order steps back on every second row).
_MIN_ROWS_PER_SEGMENT = 3


def read_csv(path: str | Path, *, lenient: bool = False) -> Run:
    """Read a CSV log with a step column and scalar columns such as loss, grad_norm and lr.

    Column names are mapped through `ALIASES`; other numeric columns are kept (sanitized names),
    non-numeric ones are dropped with a warning. A cell of a numeric column that is not a number
    (`oops` among losses) is a `RunFormatError` naming its line, or, with `lenient`, read as
    missing with a warning. A step must be a whole number from 0 to 2^53 (else `RunFormatError`
    naming the row). Rows keep file order when it is a log with resumes: a
    step that goes back and logs earlier steps again (a resumed run) starts a new `segment`. Rows
    out of order otherwise are sorted by step, with a warning. Rows of the same step within a
    segment become one row: per column, the last value that is not missing.

    Args:
        path: The CSV file.
        lenient: Read cells that are not numbers as missing (a step: the row is dropped).

    Returns:
        A Run with `source="csv"`, the step table and `missing` filled in.

    Example:
        >>> run = read_csv("megatron_log.csv")  # doctest: +SKIP
        >>> run.missing  # doctest: +SKIP
        ['layers', 'batch fingerprints', 'events', 'grad_norm']
    """
    path = Path(path)
    if not path.is_file():
        raise RunNotFoundError(f"{path}: no such file")
    check_fits(path.stat().st_size, what=str(path))  # parsed numbers take about what their text does
    try:
        # -sig: Excel writes a BOM. Blank lines are kept (and dropped below) so that data row i is line i + 2.
        raw = pd.read_csv(path, skipinitialspace=True, encoding="utf-8-sig", skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise RunFormatError(f"{path} is empty: expected a header like step,loss,grad_norm,lr") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise RunFormatError(f"{path} is not a readable CSV: {one_line(exc)}") from None
    raw = raw.loc[raw.notna().any(axis=1)]  # blank lines
    warnings: list[str] = []
    columns: dict[str, pd.Series] = {}
    for name in raw.columns:
        values = pd.to_numeric(raw[name], errors="coerce")
        if values.isna().all() and raw[name].notna().any():
            warnings.append(f"{path}: dropped non-numeric column {name!r}")
            continue
        columns[str(name)] = values
    frame, renamed = _canonical(columns, source=f"{path}")
    step_column = next((name for name, canonical in renamed.items() if canonical == "step"), "step")
    left_out = np.zeros(len(frame), dtype=bool)
    for original, name in zip(columns, frame.columns):
        if original == step_column:  # the step has checks of its own, in _with_valid_steps
            continue
        frame[name], bad = numbers(raw[original], column=original, where=_line, source=str(path), lenient=lenient,
                                   warnings=warnings)
        if name in JUDGED:
            left_out |= frame.index.isin(bad)
    frame = _with_valid_steps(frame.assign(_left_out=left_out), raw[step_column], path, warnings, lenient=lenient)
    frame = _in_log_order(frame, path, warnings)
    return _build(path, "csv", frame, warnings, {"source_file": str(path), "renamed": renamed})


def read_tensorboard(path: str | Path) -> Run:
    """Read the scalars of a TensorBoard log directory (searched recursively) as a step table.

    Tags are mapped through `ALIASES`; other scalar tags are kept as columns with sanitized names
    (`eval/accuracy` -> `eval_accuracy`). Event files written after a restart may repeat steps: all
    values are kept in file order and a step that goes backwards starts a new `segment`.

    Args:
        path: A log directory, or one `events.out.tfevents.*` file.

    Returns:
        A Run with `source="tensorboard"`, the step table and `missing` filled in.

    Example:
        >>> run = read_tensorboard("lightning_logs/version_0")  # doctest: +SKIP
        >>> run.steps[["step", "loss", "lr"]].head()  # doctest: +SKIP
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents.*"))
    if not files:
        raise RunNotFoundError(f"{path} holds no TensorBoard event files (events.out.tfevents.*)")
    check_fits(sum(f.stat().st_size for f in files), what=f"{path} ({len(files)} event files)")
    warnings: list[str] = []
    runs = _scalars_by_run(files, warnings)
    if not runs:
        raise RunFormatError(f"{path}: its TensorBoard event files hold no scalars")
    frame, renamed = _canonical(_pivot(_prefixed(runs), warnings), source=str(path))
    if "loss" not in frame.columns and len(runs) > 1:
        # Sibling runs whose folder names make no loss alias (version_0/, version_1/) are not the
        # train/ and eval/ of one training but separate trainings: analyse the one with a loss.
        chosen = _the_run_with_a_loss(path, runs)
        if chosen is not None:
            warnings.append(
                f"{path} holds {len(runs)} TensorBoard runs ({_names(path, runs)}); analysed "
                f"{_names(path, [chosen])}, the only one that logs a loss"
            )
            frame, renamed = _canonical(_pivot(runs[chosen], warnings), source=str(chosen))
            files = [f for f in files if f.parent == chosen]
    return _build(path, "tensorboard", frame, warnings, {"event_files": [str(f) for f in files], "renamed": renamed})


def _scalars_by_run(files: list[Path], warnings: list[str]) -> dict[Path, dict[str, list[tuple[float, int, float]]]]:
    """Scalar points, (wall time, step, value) in file order, per tag per TensorBoard run.

    A run, as TensorBoard counts them, is a directory holding event files.
    """
    from tensorboard.backend.event_processing import event_accumulator  # heavy: import on use
    from tensorboard.util import tensor_util

    runs: dict[Path, dict[str, list[tuple[float, int, float]]]] = {}
    for file in files:
        acc = event_accumulator.EventAccumulator(
            str(file), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False
        )
        try:
            acc.Reload()
        except Exception as exc:  # noqa: BLE001 - a corrupt event file is skipped, like a corrupt part
            warnings.append(f"skipped unreadable event file {file}: {one_line(exc)}")
            continue
        series: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            series[tag] += [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]
        for tag in tags.get("tensors", []):  # TF2-style scalar summaries are stored as tensors
            if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
                continue
            series[tag] += [
                (e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)
            ]
        for tag, points in series.items():
            runs.setdefault(file.parent, defaultdict(list))[tag] += points
    return runs


def _prefixed(runs: dict[Path, dict[str, list[tuple[float, int, float]]]]) -> dict[str, list[tuple[float, int, float]]]:
    """All runs' tags in one table: each run's tags prefixed with its folder below their common
    ancestor (`train/loss`, `eval/loss`), so the train/ and eval/ runs of one training map to
    `loss` and `eval_loss`; a run in the common ancestor itself keeps its tags as they are."""
    if len(runs) == 1:
        return next(iter(runs.values()))
    common = Path(os.path.commonpath(list(runs)))
    merged: dict[str, list[tuple[float, int, float]]] = {}
    for folder, series in runs.items():
        prefix = "" if folder == common else folder.relative_to(common).as_posix() + "/"
        merged.update({prefix + tag: points for tag, points in series.items()})
    return merged


def _the_run_with_a_loss(path: Path, runs: dict[Path, dict[str, Any]]) -> Path | None:
    """The one run that logs a loss tag; None when none does; an error naming them when several do."""
    losses = set(ALIASES["loss"])
    with_loss = [folder for folder, series in runs.items() if any(t.strip().lower() in losses for t in series)]
    if len(with_loss) > 1:
        raise RunFormatError(
            f"{path} holds {len(with_loss)} TensorBoard runs that log a loss ({_names(path, with_loss)}): "
            f"analyse one at a time, e.g. spikedoc analyze {with_loss[-1]}"
        )
    return with_loss[0] if with_loss else None


def _names(path: Path, folders: Iterable[Path], *, shown: int = 5) -> str:
    """Run folders relative to the directory given (`.` for the directory itself), the first few."""
    names = [f.relative_to(path).as_posix() if path.is_dir() else f.as_posix() for f in folders]
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _pivot(series: dict[str, list[tuple[float, int, float]]], warnings: list[str]) -> dict[str, pd.Series]:
    """One column per tag on a shared (segment, step) index; the step column comes along.

    A tag written twice for one step of a segment keeps its last value in file order, said in `warnings`.
    """
    frames = []
    repeated = 0
    for tag, points in series.items():
        wall, step, value = (np.asarray(x) for x in zip(*points))
        segment = np.concatenate([[0], np.cumsum(np.diff(step) < 0)])
        frame = pd.DataFrame({"segment": segment, "step": step, tag: value.astype("float64"), "_wall": wall})
        unique = frame.drop_duplicates(["segment", "step"], keep="last")
        repeated += len(frame) - len(unique)
        frames.append(unique.set_index(["segment", "step"]))
    if repeated:
        warnings.append(f"{repeated} scalar points repeat a (tag, step) of their segment: kept the last one in file order")
    walls = pd.concat([f["_wall"] for f in frames], axis=1).min(axis=1)
    table = pd.concat([f.drop(columns="_wall") for f in frames], axis=1).sort_index()
    table["time"] = walls
    table = table.reset_index()
    return {str(c): table[c] for c in table.columns}


def _canonical(columns: dict[str, pd.Series], *, source: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rename aliased columns to canonical names and sanitize the rest; returns the renames."""
    lookup = {name.strip().lower(): name for name in columns}
    renamed: dict[str, str] = {}
    for canonical, aliases in ALIASES.items():
        for alias in aliases:
            if alias in lookup and lookup[alias] not in renamed:
                renamed[lookup[alias]] = canonical
                break
    out: dict[str, pd.Series] = {}
    for name, values in columns.items():
        target = renamed.get(name) or _sanitize(name)
        while target in out or (target in ALIASES and name not in renamed):
            target += "_"  # never let an unmapped column shadow a canonical one
        out[target] = values
    if "step" not in out:
        raise RunFormatError(f"{source} has no step column (looked for: {', '.join(ALIASES['step'])})")
    return pd.DataFrame(out), {k: v for k, v in renamed.items() if k != v}


def _line(row: int) -> str:
    """Where a CSV data row is: the header is line 1 (blank lines are kept as rows, so the count holds)."""
    return f"line {int(row) + 2}"


def _with_valid_steps(frame: pd.DataFrame, written: pd.Series, path: Path, warnings: list[str], *,
                      lenient: bool = False) -> pd.DataFrame:
    """Rows with a step, the step as int64; a step that is not a whole number in range is an error
    (with `lenient`, one that is not a number at all is read as missing: its row is dropped).

    Truncating `1.5` or wrapping `1e30` to a negative int64 would analyse a run that was never
    logged, so the first bad value is named (with its data row, the header not counted) instead.
    """
    step = frame["step"].to_numpy(dtype="float64")
    present = written.notna().to_numpy()
    if lenient and (present & np.isnan(step)).any():
        warnings.append(f"{path}: dropped {int((present & np.isnan(step)).sum())} rows whose step is not a number "
                        "(--lenient)")
        present = present & ~np.isnan(step)
    for problem, bad in (
        ("is not a number", present & np.isnan(step)),
        ("is not a whole number", np.isfinite(step) & (step != np.floor(step))),
        (f"is out of range (steps count optimizer steps from 0 to {_MAX_STEP:,})",
         ~np.isnan(step) & ~((step >= 0) & (step <= _MAX_STEP))),
    ):  # fmt: skip
        rows = np.flatnonzero(bad)
        if rows.size:
            more = f" (and {rows.size - 1} more rows like it)" if rows.size > 1 else ""
            raise RunFormatError(
                f"{path}, data row {rows[0] + 1}: step {written.iloc[rows[0]]!s} {problem}{more}; "
                "fix or delete those rows"
            )
    dropped = int(np.isnan(step).sum())
    if dropped:
        warnings.append(f"{path}: dropped {dropped} rows without a step value")
        frame = frame.loc[~np.isnan(step)]
    return frame.assign(step=frame["step"].astype("int64"))  # the index stays the data row, for errors


def _in_log_order(frame: pd.DataFrame, path: Path, warnings: list[str]) -> pd.DataFrame:
    """One row per (segment, step): file order kept when it is a log with resumes, else sorted by step.

    A log written by a run that was resumed from a checkpoint goes back to an earlier step and logs
    again steps it had already logged; each such rewind starts a new `segment`, so the analysis
    follows the resume as a lineage and still reports the abandoned branch (as for the segments of
    a run directory). Rows that step back without re-logging anything, or that step back on more
    than one row in `_MIN_ROWS_PER_SEGMENT` (a shuffled file does on every second row), are out of
    order: they are sorted by step, with a warning. Rows of the same step that remain (consecutive
    in a log, e.g. a logger writing training and validation metrics as two rows of one step) are
    merged into one: per column, the last value in file order that is not missing. Linear after a
    sort: O(n log n).
    """
    step = frame["step"].to_numpy()
    if "segment" in frame.columns:  # the file says which segment a row belongs to (an exported run)
        segment = _whole(frame["segment"], "segment", path)
        back = (np.diff(segment) < 0) | ((np.diff(segment) == 0) & (np.diff(step) < 0))
        if back.any():
            warnings.append(f"{path}: {int(back.sum())} rows go back to an earlier segment or step: sorted by both")
    else:
        segment, resumes = _rewinds(step)
        if not resumes:
            warnings.append(
                f"{path}: rows are out of step order ({int((np.diff(step) < 0).sum())} rows go back to an earlier "
                "step, and not as a resume that logs earlier steps again): sorted by step"
            )
    groups = frame.drop(columns="segment", errors="ignore").assign(segment=segment).groupby(["segment", "step"])
    merged = groups.last()  # per column the last value that is not missing; sorted by (segment, step)
    if len(merged) < len(frame) and len(merged.columns):
        conflicts = int((groups.nunique() > 1).any(axis=1).sum())
        if conflicts:
            warnings.append(
                f"{path}: {conflicts} steps were logged more than once with different values: kept, per column, "
                "the last value in file order"
            )
    return merged.reset_index()


def _rewinds(step: np.ndarray) -> tuple[np.ndarray, bool]:
    """Segment per row, and whether every step back is a resume (see `_in_log_order`).

    When not, every row is in segment 0 (the rows are to be sorted).
    """
    back = np.flatnonzero(step[1:] < step[:-1]) + 1
    segment = np.zeros(len(step), dtype=np.int64)
    if back.size == 0:
        return segment, True
    if back.size * _MIN_ROWS_PER_SEGMENT > len(step):
        return segment, False
    starts = np.zeros(len(step), dtype=np.int64)
    starts[back] = 1
    candidate = np.cumsum(starts)
    # Segments only grow along the rows, so a step's first row holds the first segment that logged it.
    _, first_row, inverse = np.unique(step, return_index=True, return_inverse=True)
    relogged = candidate[first_row][inverse] < candidate  # this row's step was logged by an earlier segment
    resumed = np.zeros(back.size + 1, dtype=bool)
    resumed[candidate[relogged]] = True
    if not resumed[1:].all():
        return segment, False
    return candidate, True


def _whole(values: pd.Series, name: str, path: Path) -> np.ndarray:
    """A column that must hold whole numbers, as int64 (missing values are 0); its index is the data row."""
    numbers = values.fillna(0).to_numpy(dtype="float64")
    bad = np.flatnonzero(~np.isfinite(numbers) | (numbers != np.floor(numbers)) | (np.abs(numbers) > _MAX_STEP))
    if bad.size:
        raise RunFormatError(
            f"{path}, data row {values.index[bad[0]] + 1}: {name} {values.iloc[bad[0]]!s} is not a whole number"
        )
    return numbers.astype(np.int64)


def _build(path: Path, source: str, frame: pd.DataFrame, warnings: list[str], meta: dict[str, Any]) -> Run:
    """The Run of an imported step table whose `step` and `segment` are already whole numbers."""
    holes = find_holes(frame)
    if "_left_out" in frame.columns:  # rows whose judged cell was not a number (--lenient): not a hole, said already
        frame = frame.loc[~frame.pop("_left_out").astype(bool)]
    frame = frame.reset_index(drop=True)
    frame["step"] = frame["step"].astype("int64")
    frame["segment"] = frame["segment"].astype("int32")
    frame["rank"] = np.int64(0)
    frame = frame[["step", "segment", *[c for c in frame.columns if c not in ("step", "segment")]]]
    for message in warnings:
        logger.warning("spikedoc: %s", message)
    missing = list(_NEVER_IMPORTED)
    missing += [c for c in _ANALYSED if c not in frame.columns or frame[c].isna().all()]
    return Run(path=path, source=source, meta={"source": source, **meta}, steps=frame, missing=missing,
               warnings=warnings, holes=holes)


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower() or "column"
