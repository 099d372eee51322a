"""Step-table context of an incident: LR and its discontinuities, warmup, clipping, loss scale, ranks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import LOG10_SIGMA_FLOOR, finite, fmt, robust_center_scale, robust_z, was_clipped
from spikedoc.analysis.config import AnalysisConfig

__all__ = [
    "lr_columns",
    "lr_at",
    "lr_discontinuities",
    "warmup",
    "clipping_before",
    "loss_scale_drops",
    "rank_divergence",
    "update_without_grad",
]

# Smallest relative LR change that can be a discontinuity (smaller jumps cannot destabilise Adam).
_MIN_REL_JUMP = 0.2
# The lineage must start at or before this step for warmup (or its absence) to be visible.
_START_SEEN = 10
# Loss-scale halvings in the window that are more than GradScaler's routine backoff (one per
# growth_interval, 2000 steps by default).
_SCALE_HALVINGS = 2


def lr_columns(frame: pd.DataFrame) -> list[str]:
    """`lr` then `lr_<i>` columns present, in group order."""
    extra = sorted((c for c in frame.columns if c.startswith("lr_") and c[3:].isdigit()), key=lambda c: int(c[3:]))
    return (["lr"] if "lr" in frame.columns else []) + extra


def lr_at(frame: pd.DataFrame, step: int) -> float:
    """Group-0 learning rate at the last logged step <= `step` (nan when unknown)."""
    if "lr" not in frame.columns:
        return math.nan
    rows = frame.loc[frame["step"] <= step, "lr"]
    return float(rows.iloc[-1]) if len(rows) else math.nan


def lr_discontinuities(frame: pd.DataFrame, *, config: AnalysisConfig | None = None) -> list[dict[str, Any]]:
    """Steps where an LR series jumps: a change `config.lr_jump` times both neighbouring changes.

    Args:
        frame: one lineage (ordered by step) with `lr` / `lr_<i>` columns.
        config: thresholds.

    Returns:
        dicts with `step`, `group`, `before`, `after`, `factor` (after / before), `direction`.

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame({"step": range(6), "lr": [1e-4, 1e-4, 1e-4, 1e-3, 1e-3, 1e-3]})
        >>> lr_discontinuities(frame)[0]["step"]
        3
    """
    config = config or AnalysisConfig()
    out = []
    steps = frame["step"].to_numpy()
    for column in lr_columns(frame):
        lr = frame[column].to_numpy(dtype=float)
        ok = np.isfinite(lr)
        lr, at = lr[ok], steps[ok]
        if lr.size < 2:
            continue
        left, right = _neighbour_changes(np.diff(lr), config.lr_jump)
        d = np.abs(np.diff(lr))
        scale = np.maximum(np.abs(lr[:-1]), np.abs(lr[1:]))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(scale > 0, d / scale, 0.0)
        hits = np.flatnonzero((d > config.lr_jump * np.maximum(left, right)) & (rel >= _MIN_REL_JUMP))
        for i in hits:
            before, after = float(lr[i]), float(lr[i + 1])
            out.append({
                "step": int(at[i + 1]),
                "group": 0 if column == "lr" else int(column[3:]),
                "before": before,
                "after": after,
                "factor": after / before if before > 0 else math.inf,
                "direction": "up" if after > before else "down",
            })
    return sorted(out, key=lambda j: (j["step"], j["group"]))


def _neighbour_changes(change: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Per change of an LR series, the size of the schedule's change before and after it.

    Normally the adjacent changes. But an LR that leaves its schedule for one step and comes back
    (x10 on one step) is two changes of opposite sign side by side, each as large as the other: an
    adjacent change that goes the other way and is itself `ratio` times the change beyond it is the
    jump's own return, not the schedule's pace, so the change beyond it is taken instead. A ramp that
    turns (a warmup into its decay, a triangular cycle) turns at its own pace and is no such return.
    """
    d = np.abs(change)
    sign = np.sign(change)
    pad = np.zeros(2)
    d_before, d_after = np.concatenate([pad, d])[:-2], np.concatenate([d, pad])[2:]  # d[i-2], d[i+2]
    adjacent_before, adjacent_after = np.concatenate([[0.0], d[:-1]]), np.concatenate([d[1:], [0.0]])
    sign_before, sign_after = np.concatenate([[0.0], sign[:-1]]), np.concatenate([sign[1:], [0.0]])
    # The adjacent change's own other side: the change before it (for the one before), after it (for the one after).
    return_before = (sign_before * sign < 0) & (adjacent_before > ratio * d_before)
    return_after = (sign_after * sign < 0) & (adjacent_after > ratio * d_after)
    return np.where(return_before, d_before, adjacent_before), np.where(return_after, d_after, adjacent_after)


def warmup(frame: pd.DataFrame) -> dict[str, Any] | None:
    """Whether the LR series starts with a ramp, and where it ends.

    Returns None when the lineage does not start at the beginning of training or has no LR. Else
    `visible` (first LR below half the peak), `end_step` (first step at 99% of the peak),
    `first_lr`, `peak_lr`, `first_step`.
    """
    if "lr" not in frame.columns or frame.empty or int(frame["step"].iloc[0]) > _START_SEEN:
        return None
    lr = frame["lr"].to_numpy(dtype=float)
    ok = np.isfinite(lr)
    if ok.sum() < 2:
        return None
    peak = float(lr[ok].max())
    if not peak > 0:
        return None
    first = float(lr[ok][0])
    reached = np.flatnonzero(ok & (lr >= 0.99 * peak))
    return {
        "visible": first < 0.5 * peak,
        "end_step": int(frame["step"].iloc[reached[0]]) if reached.size else None,
        "first_lr": first,
        "peak_lr": peak,
        "first_step": int(frame["step"].iloc[0]),
    }


def clipping_before(frame: pd.DataFrame, onset: int, *, config: AnalysisConfig | None = None) -> dict[str, Any] | None:
    """Share of the lookback steps before `onset` whose gradient was clipped, vs the steps before.

    Returns None without a `clip_coef` column. `at_onset`: the onset step's own clip coefficient
    when it was clipped, else None. `saturated` when the share reaches
    `config.clip_saturation` and is at least twice the share over the rows of `frame` before the
    lookback window (analyze passes the 1,000 steps before onset).
    """
    config = config or AnalysisConfig()
    if "clip_coef" not in frame.columns:
        return None
    coef = frame["clip_coef"].to_numpy(dtype=float)
    steps = frame["step"].to_numpy()
    window = (steps >= onset - config.lookback) & (steps < onset) & np.isfinite(coef)
    earlier = (steps < onset - config.lookback) & np.isfinite(coef)
    if window.sum() == 0:
        return None
    clipped = was_clipped(coef)
    share = float(clipped[window].mean())
    run_share = float(clipped[earlier].mean()) if earlier.any() else math.nan
    in_window = coef[window & clipped]
    at = coef[(steps == onset) & np.isfinite(coef)]
    return {
        "share": share,
        "steps": int(window.sum()),
        "run_share": run_share,
        "run_steps": int(earlier.sum()),
        "median_coef": float(np.median(in_window)) if in_window.size else 1.0,
        "saturated": share >= config.clip_saturation and not (run_share * 2 > share),
        "ever": bool(clipped[np.isfinite(coef)].any()),
        # What the clip did to the onset step itself (a spike the clip cut hard), None when it did not clip it.
        "at_onset": float(at[0]) if at.size and was_clipped(at)[0] else None,
    }


def loss_scale_drops(frame: pd.DataFrame, start: int, stop: int) -> dict[str, Any] | None:
    """Loss-scale halvings and skipped steps in [start, stop]; `notable` beyond routine backoff."""
    if "loss_scale" not in frame.columns:
        return None
    rows = frame.loc[(frame["step"] >= start) & (frame["step"] <= stop)]
    scale = finite(rows["loss_scale"].to_numpy(dtype=float))
    if scale.size < 2:
        return None
    drops = np.diff(scale) < 0
    high, low = float(scale.max()), float(scale[int(np.argmax(scale)):].min())
    halvings = math.log2(high / low) if low > 0 else math.inf
    skipped = int(rows["skipped"].fillna(False).astype(bool).sum()) if "skipped" in rows.columns else 0
    return {
        "from": high,
        "to": low,
        "halvings": halvings,
        "drops": int(drops.sum()),
        "skipped": skipped,
        "notable": halvings >= _SCALE_HALVINGS,
    }


def rank_divergence(
    rows: pd.DataFrame, onset: int, end: int, *, config: AnalysisConfig | None = None
) -> dict[str, Any] | None:
    """Ranks whose loss alone went non-finite or off the other ranks at the incident.

    Each rank's loss is compared with the median of all ranks at the same step; the spread of that
    difference over the history before onset is the rank's own noise.

    Returns None for single-rank runs; else `off_ranks`, `ranks`, `alone` (a minority of ranks),
    and `sentences`.
    """
    config = config or AnalysisConfig()
    if "rank" not in rows.columns or "loss" not in rows.columns or rows["rank"].nunique() < 2:
        return None
    wide = rows.pivot_table(index="step", columns="rank", values="loss", aggfunc="last", dropna=False)
    history = wide.loc[(wide.index < onset) & (wide.index >= onset - config.lookback * 3)]
    window = wide.loc[(wide.index >= onset) & (wide.index <= max(end, onset))]
    if window.empty:
        return None
    ranks = [int(r) for r in wide.columns]
    off, sentences = [], []
    for rank in wide.columns:
        others = window.drop(columns=rank)
        nonfinite = ~np.isfinite(window[rank].to_numpy(dtype=float))
        others_ok = np.isfinite(others.to_numpy(dtype=float)).all(axis=1)
        if (nonfinite & others_ok).any():
            step = int(window.index[np.flatnonzero(nonfinite & others_ok)[0]])
            off.append(int(rank))
            sentences.append(f"rank {int(rank)}'s loss went non-finite at step {step} while every other rank's stayed finite")
            continue
        diff_hist = (history[rank] - history.drop(columns=rank).median(axis=1)).to_numpy(dtype=float)
        center, sigma = robust_center_scale(diff_hist)
        if not math.isfinite(sigma) or finite(diff_hist).size < 8:
            continue
        diff = (window[rank] - others.median(axis=1)).to_numpy(dtype=float)
        z = np.array([robust_z(d, center, max(sigma, 1e-12)) for d in diff])
        if np.nanmax(np.where(np.isfinite(z), z, np.nan), initial=-np.inf) >= config.z_threshold:
            i = int(np.nanargmax(np.where(np.isfinite(z), z, -np.inf)))
            off.append(int(rank))
            sentences.append(
                f"rank {int(rank)}'s loss at step {int(window.index[i])} was {fmt(z[i], 2)} sigma above the other "
                f"ranks' median (its usual gap is {fmt(center)} +- {fmt(sigma)})"
            )
    alone = 0 < len(off) and (len(off) == 1 or len(off) < len(ranks) / 2) and len(off) < len(ranks)
    return {"ranks": ranks, "off_ranks": off, "alone": alone, "sentences": sentences}


def update_without_grad(frame: pd.DataFrame, onset: int, peak: int, *, config: AnalysisConfig | None = None,
                        before: int = 0) -> dict[str, Any] | None:
    """Global update norm per unit LR far above its history while the gradient norm is not.

    Dividing by the LR removes schedule effects; what is left moves with the optimizer's state
    (Adam's denominator, a momentum buffer). The steps read run from `before` steps ahead of onset
    (the update of step t shows in the loss of t+1) to the peak; the first of them whose update is
    off decides, and the gradient norm must not be off at it or at any step read before it: a
    gradient that jumped first explains its update. Returns None when the columns or the history
    are missing.
    """
    config = config or AnalysisConfig()
    needed = {"update_norm", "grad_norm", "lr"}
    if not needed <= set(frame.columns):
        return None
    steps = frame["step"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        per_lr = np.log10(frame["update_norm"].to_numpy(dtype=float) / frame["lr"].to_numpy(dtype=float))
        grad = np.log10(frame["grad_norm"].to_numpy(dtype=float))
    hist = (steps < onset - config.lookback // 4) & (steps >= onset - config.lookback * 3)
    at = (steps >= onset - before) & (steps <= max(onset, peak))
    if finite(per_lr[hist]).size < 8 or not at.any():
        return None
    zs = {}
    for key, series in (("update", per_lr), ("grad", grad)):
        center, sigma = robust_center_scale(series[hist])
        sigma = max(sigma, LOG10_SIGMA_FLOOR)  # the per-tensor scores' floor
        zs[key] = np.array([robust_z(v, center, sigma) if math.isfinite(v) else math.nan for v in series[at]])
    off = np.flatnonzero(zs["update"] >= config.z_threshold)
    first = int(off[0]) if off.size else int(np.nanargmax(np.where(np.isfinite(zs["update"]), zs["update"], -np.inf)))
    grad_z = float(np.nanmax(zs["grad"][: first + 1], initial=-np.inf))
    fired = off.size > 0 and not grad_z >= config.z_threshold / 2
    return {"update_z": float(zs["update"][first]), "grad_z": grad_z, "step": int(steps[at][first]), "fired": bool(fired)}
