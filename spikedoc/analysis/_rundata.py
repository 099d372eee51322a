"""Run-data helpers of analyze(): rank reduction, per-piece shared data, checkpoints, clip in use."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import watch_config
from spikedoc.analysis._robust import finite, was_clipped
from spikedoc.analysis.batches import positions_restarted
from spikedoc.analysis.context import _START_SEEN, warmup
from spikedoc.analysis.detect import spike_score

__all__ = ["has_finite", "reduce_ranks", "PieceData", "checkpoints_of", "clip_in_use", "segment_ranges", "in_ranges", "score"]


def reduce_ranks(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per (segment, step): rank 0's row, with the loss averaged and the grad norm maxed over ranks."""
    if "rank" not in steps.columns or steps["rank"].nunique() < 2:
        return steps.drop(columns=[c for c in ("rank",) if c in steps.columns])
    keys = ["segment", "step"]
    first = steps.sort_values("rank", kind="stable").drop_duplicates(keys, keep="first").drop(columns="rank")
    by = [steps[k] for k in keys]
    grouped = steps.groupby(by, sort=False)
    merged = pd.DataFrame({"loss": grouped["loss"].mean()})
    # A NaN on any rank is a NaN of the step (pandas' reductions would skip it).
    merged.loc[steps["loss"].isna().groupby(by, sort=False).any(), "loss"] = np.nan
    if "grad_norm" in steps.columns:
        merged["grad_norm"] = grouped["grad_norm"].max()
        merged.loc[steps["grad_norm"].isna().groupby(by, sort=False).any(), "grad_norm"] = np.nan
    if "nonfinite_grads" in steps.columns:
        merged["nonfinite_grads"] = grouped["nonfinite_grads"].sum()
    out = first.drop(columns=list(merged.columns)).merge(merged.reset_index(), on=keys, how="left")
    return out.sort_values(keys, kind="stable").reset_index(drop=True)


class PieceData:
    """What every incident of one piece shares: its lineage frame and what is computed once on it.

    `healthy` marks the steps the loss detector did not flag (they may fit a trajectory);
    `first_up_jump` is the first upward LR discontinuity of the lineage, if any: the schedule's
    intended peak and its warmup are read from the LR before it, never from the jumped LR.
    `piece` (the lineage piece), `incidents` (all found on it), `jumps` (its LR discontinuities),
    `resume` and `moments_ratio` (its resume check) are the piece's own context; `state_jumps` its
    steps where the update per unit LR jumped with a quiet gradient (`change_points.state_jumps`).
    """

    def __init__(self, frame: pd.DataFrame, hashes: dict[str, Any], checkpoints: list[tuple[int, str | None]], *,
                 healthy: np.ndarray | None = None, first_up_jump: int | None = None, piece: Any = None,
                 incidents: list[Any] = (), jumps: list[dict[str, Any]] = (), resume: Any = None,
                 moments_ratio: float | None = None, state_jumps: list[int] = ()) -> None:  # fmt: skip
        self.frame, self.hashes, self.checkpoints = frame, hashes, checkpoints
        self.piece, self.incidents, self.jumps = piece, list(incidents), list(jumps)
        self.resume, self.moments_ratio, self.state_jumps = resume, moments_ratio, list(state_jumps)
        self.positions_restarted = positions_restarted(frame)
        self.steps = frame["step"].to_numpy()
        self.first_step = int(self.steps[0])
        self.healthy = np.ones(len(frame), dtype=bool) if healthy is None else healthy
        self.initial_loss = _initial_loss(frame)
        scheduled = frame if first_up_jump is None else frame.loc[frame["step"] < first_up_jump]
        self.warmup = warmup(scheduled) if len(scheduled) else None
        lr = frame["lr"].to_numpy(dtype=float) if "lr" in frame.columns else np.full(len(frame), np.nan)
        if first_up_jump is not None:
            lr = np.where(self.steps < first_up_jump, lr, np.nan)
        self._lr_max = np.fmax.accumulate(np.where(np.isfinite(lr), lr, -np.inf)) if len(lr) else lr

    def window(self, start: int, stop: int) -> pd.DataFrame:
        """Rows with start <= step <= stop, plus the next row (the step after the incident)."""
        return self.frame.iloc[self._bounds(start, stop)]

    def healthy_window(self, start: int, stop: int) -> np.ndarray:
        """`healthy` for the rows of `window(start, stop)`."""
        return self.healthy[self._bounds(start, stop)]

    def _bounds(self, start: int, stop: int) -> slice:
        lo = int(np.searchsorted(self.steps, start, side="left"))
        hi = int(np.searchsorted(self.steps, stop, side="right")) + 1
        return slice(lo, hi)

    def peak_lr_before(self, step: int) -> float | None:
        """Largest scheduled LR before `step` (an LR after an upward jump is not the schedule's)."""
        i = int(np.searchsorted(self.steps, step, side="left")) - 1
        if i < 0 or not np.isfinite(self._lr_max[i]) or self._lr_max[i] <= 0:
            return None
        return float(self._lr_max[i])


def _initial_loss(frame: pd.DataFrame) -> float | None:
    """Median of the first 3 finite losses when the lineage starts at the beginning of training."""
    if "loss" not in frame.columns or frame.empty or int(frame["step"].iloc[0]) > _START_SEEN:
        return None
    first = finite(frame["loss"].to_numpy(dtype=float)[:10])[:3]
    return float(np.median(first)) if first.size else None


def checkpoints_of(events: pd.DataFrame | None) -> list[tuple[int, int, str | None]]:
    if events is None or events.empty or "kind" not in events.columns:
        return []
    rows = events.loc[events["kind"] == "checkpoint"]
    out = []
    for _, row in rows.iterrows():
        path = None
        try:
            detail = json.loads(row.get("detail") or "{}")
            path = detail.get("path") if isinstance(detail, dict) else None
        except (TypeError, ValueError):
            pass
        segment = row.get("segment")
        out.append((int(row["step"]), int(segment) if segment is not None and segment == segment else 0, path))
    return out


def clip_in_use(meta: dict[str, Any], steps: pd.DataFrame) -> float | None:
    """The clipping max norm in use: meta config `clip`, else the loop's own (`clip_max_norm`, its
    latest value), else inferred from clipped steps' grad_norm * clip_coef."""
    clip = (watch_config(meta) or {}).get("clip")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0:
        return float(clip)
    if "clip_max_norm" in steps.columns:
        loop = finite(pd.to_numeric(steps["clip_max_norm"], errors="coerce"))
        loop = loop[loop > 0]
        if loop.size:
            # A max norm changed during the run: the one in force at its end. Stored as float32:
            # 7 significant digits give back the value the loop passed (0.3, not 0.30000001).
            return float(f"{loop[-1]:.7g}")
    if {"clip_coef", "grad_norm"} <= set(steps.columns):
        coef = steps["clip_coef"].to_numpy(dtype=float)
        grad = steps["grad_norm"].to_numpy(dtype=float)
        clipped = np.isfinite(coef) & np.isfinite(grad) & was_clipped(coef)
        if clipped.any():
            return float(np.median(coef[clipped] * grad[clipped]))
    return None


def segment_ranges(frame: pd.DataFrame) -> dict[int, tuple[int, int]]:
    if frame.empty:
        return {}
    grouped = frame.groupby("segment")["step"].agg(["min", "max"])
    return {int(seg): (int(row["min"]), int(row["max"])) for seg, row in grouped.iterrows()}


def in_ranges(rows: pd.DataFrame, ranges: dict[int, tuple[int, int]]) -> pd.DataFrame:
    seg = rows["segment"].to_numpy()
    step = rows["step"].to_numpy()
    mask = np.zeros(len(rows), dtype=bool)
    for segment, (lo, hi) in ranges.items():
        mask |= (seg == segment) & (step >= lo) & (step <= hi)
    return rows.loc[mask]


def score(frame: pd.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = finite(frame[column])
    if values.size < 3:
        return None
    score = spike_score(values)
    return None if math.isnan(score) else score


def has_finite(steps: pd.DataFrame, column: str) -> bool:
    """`column` exists and holds at least one finite number."""
    return column in steps.columns and bool(np.isfinite(pd.to_numeric(steps[column], errors="coerce").to_numpy(dtype=float)).any())
