"""Import runs logged by other tools (CSV files, TensorBoard event files) as step tables."""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.errors import RunFormatError, RunNotFoundError
from spikedoc.store.reader import Run

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


def read_csv(path: str | Path) -> Run:
    """Read a CSV log with a step column and scalar columns such as loss, grad_norm and lr.

    Column names are mapped through `ALIASES`; other numeric columns are kept (sanitized names),
    non-numeric ones are dropped with a warning. Rows keep file order: a step that goes backwards
    (a resumed run repeating steps) starts a new `segment`.

    Args:
        path: The CSV file.

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
    try:
        raw = pd.read_csv(path, skipinitialspace=True, encoding="utf-8-sig")  # -sig: Excel writes a BOM
    except pd.errors.EmptyDataError:
        raise RunFormatError(f"{path} is empty: expected a header like step,loss,grad_norm,lr") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise RunFormatError(f"{path} is not a readable CSV: {' '.join(str(exc).split())}") from None
    warnings: list[str] = []
    columns: dict[str, pd.Series] = {}
    for name in raw.columns:
        values = pd.to_numeric(raw[name], errors="coerce")
        if values.isna().all() and raw[name].notna().any():
            warnings.append(f"{path}: dropped non-numeric column {name!r}")
            continue
        columns[str(name)] = values
    frame, renamed = _canonical(columns, source=f"{path}")
    run = _build(path, "csv", frame, warnings, {"source_file": str(path), "renamed": renamed})
    return run


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
    from tensorboard.backend.event_processing import event_accumulator  # heavy: import on use
    from tensorboard.util import tensor_util

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("events.out.tfevents.*"))
    if not files:
        raise RunNotFoundError(f"{path} holds no TensorBoard event files (events.out.tfevents.*)")
    series: dict[str, list[tuple[float, int, float]]] = defaultdict(list)  # tag -> (wall, step, value)
    warnings: list[str] = []
    for file in files:
        acc = event_accumulator.EventAccumulator(
            str(file), size_guidance={"scalars": 0, "tensors": 0}, purge_orphaned_data=False
        )
        try:
            acc.Reload()
        except Exception as exc:  # noqa: BLE001 - a corrupt event file is skipped, like a corrupt part
            warnings.append(f"skipped unreadable event file {file}: {' '.join(str(exc).split())}")
            continue
        prefix = _prefix(files, file)
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            series[prefix + tag] += [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]
        for tag in tags.get("tensors", []):  # TF2-style scalar summaries are stored as tensors
            if acc.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
                continue
            values = [
                (e.wall_time, e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)
            ]
            series[prefix + tag] += values
    for message in warnings:
        logger.warning("spikedoc: %s", message)
    if not series:
        raise RunFormatError(f"{path}: its TensorBoard event files hold no scalars")
    frame, renamed = _canonical(_pivot(series), source=str(path))
    return _build(path, "tensorboard", frame, warnings, {"event_files": [str(f) for f in files], "renamed": renamed})


def _prefix(files: list[Path], file: Path) -> str:
    # Event files in sibling directories (train/, eval/) are separate TensorBoard runs: their tags
    # are prefixed with the directory below the common ancestor, so `train/loss` maps to `loss`.
    parents = {f.parent for f in files}
    if len(parents) == 1:
        return ""
    return file.parent.relative_to(os.path.commonpath(parents)).as_posix() + "/"


def _pivot(series: dict[str, list[tuple[float, int, float]]]) -> dict[str, pd.Series]:
    """One column per tag on a shared (segment, step) index; the step column comes along."""
    frames = []
    for tag, points in series.items():
        wall, step, value = (np.asarray(x) for x in zip(*points))
        segment = np.concatenate([[0], np.cumsum(np.diff(step) < 0)])
        frame = pd.DataFrame({"segment": segment, "step": step, tag: value.astype("float64"), "_wall": wall})
        frames.append(frame.drop_duplicates(["segment", "step"], keep="last").set_index(["segment", "step"]))
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


def _build(path: Path, source: str, frame: pd.DataFrame, warnings: list[str], meta: dict[str, Any]) -> Run:
    dropped = int(frame["step"].isna().sum())
    if dropped:
        warnings.append(f"{path}: dropped {dropped} rows without a step value")
        frame = frame[frame["step"].notna()]
    frame = frame.reset_index(drop=True)
    frame["step"] = frame["step"].astype("int64")
    if "segment" not in frame.columns:  # a step that goes backwards is a resume: new segment
        frame.insert(
            1, "segment", np.concatenate([[0], np.cumsum(np.diff(frame["step"].to_numpy()) < 0)])[: len(frame)]
        )
    frame["segment"] = frame["segment"].astype("int32")
    frame["rank"] = np.int64(0)
    frame = frame[["step", "segment", *[c for c in frame.columns if c not in ("step", "segment")]]]
    for message in warnings:
        logger.warning("spikedoc: %s", message)
    missing = list(_NEVER_IMPORTED)
    missing += [c for c in _ANALYSED if c not in frame.columns or frame[c].isna().all()]
    return Run(
        path=path, source=source, meta={"source": source, **meta}, steps=frame, missing=missing, warnings=warnings
    )


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower() or "column"
