"""Optimizer-state precursors of an incident: a second moment collapsing, the eps-dominated share
rising, an update without a gradient; each judged against the tensor's own history. A second moment
that fell further, or a first moment that grew further, than the optimizer's updates allow is said
to be written from outside it."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import LOG10_SIGMA_FLOOR, MAD_TO_SIGMA, fmt, steps_text
from spikedoc.analysis.config import AnalysisConfig

__all__ = ["MIN_HISTORY", "MOMENTUM_COLUMNS", "ROUNDING", "V_DECAY_FLOOR", "Window", "falls_beyond_updates", "history_count",
           "momentum_beyond", "nan_max", "optimizer_precursors", "wide_table"]

# eps_frac must rise by at least this absolute share of elements to count as a precursor.
_EPS_FRAC_RISE = 0.05
# Smallest sigma of eps_frac (a share of elements) believed: half a percent of the tensor.
_EPS_FRAC_SIGMA_FLOOR = 0.005
# exp_avg_sq_mean at or below this share of its history counts as a collapse (one decade).
_V_COLLAPSE = 0.1
# Fewer logged steps than this before the scan window: no per-tensor baseline.
MIN_HISTORY = 8
# An Adam-family update shrinks a second moment by at most its beta2 per step (v = beta2 v + (1 - beta2) g^2);
# 0.9 is the lowest beta2 in common use (0.95 to 0.999 in LLM recipes), so a fall below 0.9 ** steps
# between two measurements is no update's doing: the state was written from outside the optimizer.
V_DECAY_FLOOR = 0.9
#: First-moment columns: Adam's `exp_avg`, SGD's and Lion's momentum (norms per tensor).
MOMENTUM_COLUMNS = {"exp_avg_norm": "exp_avg", "momentum_norm": "momentum"}
#: The statistics are float32: a moment exactly at its bound must not read as beyond it.
ROUNDING = 1e-4




def wide_table(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """steps x tensors table of one metric (NaN where a tensor was not logged; of rows repeating a
    (step, tensor), the last), steps ascending and tensors sorted by name.

    Example:
        >>> rows = pd.DataFrame({"step": [1, 1, 0, 1], "name": ["b", "a", "a", "b"], "g": [1.0, 2.0, 3.0, 4.0]})
        >>> wide_table(rows, "g").to_dict()
        {'a': {0: 3.0, 1: 2.0}, 'b': {0: nan, 1: 4.0}}
    """
    # Codes and one array assignment, not a pandas pivot: the whole run's table is read in chunks of
    # millions of rows (`state_writes`), where unstack's sorting costs seconds per chunk.
    step_codes, steps = pd.factorize(layers["step"], sort=True)
    name_codes, names = pd.factorize(layers["name"].astype(str) if layers["name"].dtype == object else layers["name"], sort=True)
    key = step_codes.astype(np.int64) * max(len(names), 1) + name_codes
    last = len(key) - 1 - np.unique(key[::-1], return_index=True)[1]  # each (step, tensor)'s last row
    values = np.full((len(steps), len(names)), np.nan)
    values[step_codes[last], name_codes[last]] = pd.to_numeric(layers[metric], errors="coerce").to_numpy(dtype=float)[last]
    return pd.DataFrame(values, index=pd.Index(np.asarray(steps), name="step"),
                        columns=pd.Index([str(n) for n in names], name="name"))


def _state_table(layers: pd.DataFrame, metric: str, onset: int, scan_steps: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """An optimizer-state metric on the steps that measured it, and the scan steps up to `onset`.

    Under a cost budget the state statistics come every few steps: changes are then taken between
    measured steps, and when `onset` itself was not measured the scan runs on to the first step
    that was. The state changes judged here (a second moment collapsing, the eps-dominated share
    rising) go the other way from what a spike's large gradients do to the state, so seen first
    after onset they still happened before it, in the gap.
    """
    wide = wide_table(layers, metric)
    wide = wide.loc[wide.notna().any(axis=1)]
    measured = wide.index.to_numpy()
    after = measured[measured >= onset]
    until = int(after[0]) if after.size else onset
    first = scan_steps[0] if scan_steps.size else onset
    return wide, measured[(measured >= first) & (measured <= until)]


def _gap_start(wide: pd.DataFrame, step: int) -> int:
    """First step of the gap that ends at measured `step` (the step after the previous measured one)."""
    before = wide.index.to_numpy()
    before = before[before < step]
    return int(before[-1]) + 1 if before.size else step


def history_count(base: np.ndarray) -> np.ndarray:
    """Finite baseline values per tensor (column)."""
    return np.isfinite(np.asarray(base, dtype=float)).sum(axis=0)


@dataclass(frozen=True, kw_only=True)
class Window:
    """The steps one incident's per-tensor scores are computed over."""

    base_steps: np.ndarray
    """Logged steps of each tensor's baseline (before the scan)."""
    scan_steps: np.ndarray
    """Logged steps scanned for departures (lookback window to the peak)."""
    onset: int
    peak: int
    reference: int
    """The step leads are measured to."""


def optimizer_precursors(layers: pd.DataFrame, window: Window, rows: list[dict[str, Any]],
                          config: AnalysisConfig, gradient_decay: dict[str, float] | None = None,
                          v_decay: dict[str, float] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Optimizer-state changes before onset that are anomalous against the tensor's own variation.

    A level far from the tensor's history is not enough: healthy runs drift (a bias tensor's
    second moment can fall 20x over a few hundred steps as its gradient shrinks). A precursor also
    changes at a rate its history never showed: its change over `config.sudden_steps` logged steps
    is `z_threshold` robust sigmas off the same change measured over its baseline. And it is dated
    inside the scan window: a change first seen after a gap in the state statistics that reaches
    back before the window (a cost budget's sparse steps early in a run) could be the slow early
    decline every run shows, spread over the gap.

    `gradient_decay` (parameter name -> weight decay coupled into its gradient, 0 when decoupled;
    `spikedoc.analysis._meta.gradient_weight_decay`) lets a first moment be held to what its
    updates allow; tensors it does not name are not held to it. `v_decay` (parameter name -> its
    beta2, at most 0.9; `spikedoc.analysis._meta.second_moment_decay`) holds a second moment to the
    fall its updates allow, at any size of fall.
    """
    base_steps, scan_steps, onset, peak, reference = (window.base_steps, window.scan_steps, window.onset,
                                                      window.peak, window.reference)  # fmt: skip
    found = []
    if "eps_frac" in layers.columns:
        wide, scanned = _state_table(layers, "eps_frac", max(onset, peak), scan_steps)
        base, scan, steps = _split(wide, base_steps, scanned)
        finite_base = np.where(np.isfinite(base), base, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # tensors without history: center NaN, skipped
            center = np.where(history_count(finite_base) >= MIN_HISTORY, np.nanmedian(finite_base, axis=0), np.nan)
            sigma = np.fmax(MAD_TO_SIGMA * np.nanmedian(np.abs(finite_base - center), axis=0), _EPS_FRAC_SIGMA_FLOOR)
            level = (scan - center >= _EPS_FRAC_RISE) & ((scan - center) / sigma >= config.z_threshold)
        hits = level & (_rate_z(wide, base_steps, steps, config.sudden_steps, _EPS_FRAC_SIGMA_FLOOR) >= config.z_threshold)
        for j in np.flatnonzero(hits.any(axis=0) & np.isfinite(center)):
            name, seen, value, before = wide.columns[j], int(steps[hits[:, j].argmax()]), nan_max(scan[:, j]), float(center[j])
            step, when = _when(wide, seen)
            if step < scan_steps[0]:
                continue  # the change may have happened anywhere in a gap reaching before the window: a drift cannot be ruled out
            found.append({
                "name": name, "kind": "eps_frac_rise", "before": before, "value": value, "step": step,
                "lead_steps": max(0, reference - step), "at_onset": bool(hits[steps >= reference - config.sudden_steps, j].any()),
                "sentence": f"eps-dominated fraction of {name} rose from {fmt(before, 2)} to {fmt(value, 2)} "
                f"{when}, faster than it ever moved before",
            })
    if "exp_avg_sq_mean" in layers.columns:
        wide, scanned = _state_table(layers, "exp_avg_sq_mean", onset, scan_steps)
        base, scan, steps = _split(wide, base_steps, scanned)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            center = np.where(history_count(base) >= MIN_HISTORY, np.nanmedian(base, axis=0), np.nan)
            level = (scan / center <= _V_COLLAPSE) & (center > 0)
            logs = np.log10(np.where(wide > 0, wide, np.nan))
        falling = -_rate_z(pd.DataFrame(logs, index=wide.index, columns=wide.columns), base_steps, steps,
                           config.sudden_steps, LOG10_SIGMA_FLOOR)
        # A collapse faster than it ever moved before (across a gap in the statistics too: faster than
        # any update can make); or, for an Adam-family tensor whose beta2 is known (`v_decay`), any
        # fall below what its updates allow, whatever its size: the state was written.
        known = falls_beyond_updates(wide, v_decay or {})[0].reindex(steps).to_numpy(dtype=bool)
        hits = (level & ((falling >= config.z_threshold) | _beyond_updates(wide).reindex(steps).to_numpy(dtype=bool))) | known
        for j in np.flatnonzero(hits.any(axis=0)):
            name, seen = wide.columns[j], int(steps[hits[:, j].argmax()])
            step, when = _when(wide, seen)
            if step < scan_steps[0]:
                continue  # as above: not dated inside the window
            floor = (v_decay or {}).get(name, V_DECAY_FLOOR)
            fell = _fall_beyond_updates(wide[name], seen, floor)
            collapse = bool(level[:, j].any())
            before = float(center[j]) if collapse else float(wide[name].loc[: seen - 1].dropna().iloc[-1])
            low = float(np.nanmin(scan[:, j])) if collapse else float(wide.at[seen, name])
            found.append({
                "name": name, "kind": "exp_avg_sq_collapse", "before": before, "value": low, "step": step, "seen": seen,
                "lead_steps": max(0, reference - step), "at_onset": bool(hits[steps >= reference - config.sudden_steps, j].any()),
                "overwritten": fell is not None,
                "sentence": (f"exp_avg_sq of {name} collapsed to {fmt(low / before, 2)}x its history "
                             f"({fmt(before)} -> {fmt(low)}) {when}, faster than it ever moved before; " if collapse
                             else f"exp_avg_sq of {name} fell {when}: ")
                + (f"it fell to {fmt(fell[0], 2)}x in {steps_text(fell[1])}, below the {fmt(floor ** fell[1], 2)}x "
                   f"Adam's updates allow (beta2 >= {fmt(floor, 2)} per step): the state was written from outside the optimizer"
                   if fell is not None else ""),
            })
    for metric, label in MOMENTUM_COLUMNS.items():
        if metric in layers.columns and "grad_norm" in layers.columns and gradient_decay:
            found += _momentum_written(layers, metric, label, window, config, gradient_decay)
    for row in rows:
        if row["update_z"] >= config.z_threshold and not row["grad_z"] >= config.z_threshold / 2:
            found.append({
                "name": row["name"], "kind": "update_without_grad", "before": None, "value": row["update_z"],
                "step": row["departed_step"], "lead_steps": row["lead_steps"], "at_onset": True,
                "sentence": f"update/weight ratio of {row['name']} is {fmt(row['update_z'], 2)} sigma off its history "
                f"while its gradient norm is not (z {fmt(row['grad_z'], 2)}): the optimizer state, not the gradient, "
                "made the step large",
            })
    found.sort(key=lambda p: p["step"] if p["step"] is not None else onset)
    return found


def _momentum_written(layers: pd.DataFrame, metric: str, label: str, window: Window, config: AnalysisConfig,
                      gradient_decay: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """First moments that grew, by the onset, beyond what their updates since the measurement before allow."""
    wide, scanned = _state_table(layers, metric, window.onset, window.scan_steps)
    ratio, bound = momentum_beyond(layers, wide, gradient_decay)
    hits = ratio.reindex(scanned) > 1 + ROUNDING
    found = []
    for name in hits.columns[hits.any(axis=0).to_numpy()]:
        seen = int(hits.index[hits[name].to_numpy()][0])
        step, when = _when(wide, seen)
        if step < window.scan_steps[0]:
            continue
        before = float(wide[name].loc[: seen - 1].dropna().iloc[-1])
        value, most = float(wide.at[seen, name]), float(bound.at[seen, name])
        found.append({
            "name": name, "kind": "momentum_jump", "before": before, "value": value, "step": step, "seen": seen,
            "lead_steps": max(0, window.reference - step),
            "at_onset": bool(hits[name].loc[window.reference - config.sudden_steps:].any()), "overwritten": True,
            "sentence": f"{label} of {name} grew from {fmt(before)} to {fmt(value)} {when}, {fmt(value / most, 2)}x the "
            f"most its gradients could have added ({fmt(most)}): the state was written from outside the optimizer",
        })  # fmt: skip
    return found


def momentum_beyond(layers: pd.DataFrame, wide: pd.DataFrame,
                     gradient_decay: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Per measured step and tensor: the first moment's norm over the most its updates since the
    measurement before could have made it, and that most (NaN where not judged).

    Each update moves the moment m by a convex step toward the gradient (Adam's and Lion's `lerp`)
    or adds the gradient to the decayed moment (SGD: mu m + (1 - dampening) g), so
    `|m_t| <= |m_{t-1}| + |g_t|`, g the gradient the optimizer saw: the recorded one (before any
    clip, unscaled) plus the weight decay coupled into it (`wd |p_{t-1}|`). Judged only where every
    step in between logged what the bound needs, within one segment: a resume or a rollback loads
    its state (the lineage's business).
    """
    grads = wide_table(layers, "grad_norm")
    params = wide_table(layers, "param_norm").reindex(grads.index) if "param_norm" in layers.columns else None
    steps = grads.index.to_numpy()
    segments = (layers.drop_duplicates("step", keep="last").set_index("step")["segment"].reindex(grads.index).to_numpy()
                if "segment" in layers.columns else np.zeros(len(steps)))  # fmt: skip
    ratio = pd.DataFrame(np.nan, index=wide.index, columns=wide.columns)
    bound = ratio.copy()
    for name in wide.columns:
        decay = gradient_decay.get(name)
        if decay is None or name not in grads.columns or (decay > 0 and (params is None or name not in params.columns)):
            continue
        reach = grads[name].to_numpy(dtype=float)
        if decay > 0:
            reach = reach + decay * params[name].shift(1).to_numpy(dtype=float)  # the weights before each step
        total = np.r_[0.0, np.cumsum(np.nan_to_num(reach))]
        holes = np.r_[0, np.cumsum(~np.isfinite(reach))]
        column = wide[name].dropna()
        at = column.index.to_numpy()
        pos = np.searchsorted(steps, at)
        logged = (pos < len(steps)) & (steps[np.minimum(pos, len(steps) - 1)] == at)
        a, b = pos[:-1], pos[1:]
        ok = logged[:-1] & logged[1:] & (b - a == np.diff(at))  # every step in between logged its gradient
        ok[ok] &= (holes[b[ok] + 1] - holes[a[ok] + 1] == 0) & (segments[a[ok]] == segments[b[ok]])
        most = column.to_numpy()[:-1] + total[np.minimum(b, len(steps) - 1) + 1] - total[np.minimum(a, len(steps) - 1) + 1]
        with np.errstate(all="ignore"):
            ratio.loc[at[1:][ok], name] = column.to_numpy()[1:][ok] / most[ok]
        bound.loc[at[1:][ok], name] = most[ok]
    return ratio, bound


def _falls(wide: pd.DataFrame, floor: float = V_DECAY_FLOOR) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per measured step and tensor: the second moment over its last measured value before, the
    steps between the two, and whether that fall is below what Adam-family updates allow
    (`floor ** steps`, `floor` the smallest beta2)."""
    index = wide.index.to_numpy(dtype=float)
    measured_at = pd.DataFrame(np.where(wide.notna(), index[:, None], np.nan), index=wide.index, columns=wide.columns)
    last, last_at = wide.shift(1).ffill(), measured_at.shift(1).ffill()
    gap = pd.DataFrame(index[:, None] - last_at.to_numpy(), index=wide.index, columns=wide.columns)
    with np.errstate(all="ignore"):
        ratio = wide / last.where(last > 0)
        beyond = (ratio < floor**gap * (1 - ROUNDING)).fillna(False)
    return ratio, gap, beyond


def falls_beyond_updates(wide: pd.DataFrame, v_decay: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per measured step and tensor named in `v_decay` (its beta2, the least factor one update can
    shrink it by): whether the second moment fell below what its updates allow since its measurement
    before (v_t >= beta2 v_(t-1) elementwise, so its mean too), and that least value. Tensors not
    named: False and NaN.

    Example:
        >>> beyond, least = falls_beyond_updates(pd.DataFrame({"w": [1.0, 0.95, 0.01]}, index=[10, 11, 12]), {"w": 0.9})
        >>> beyond["w"].tolist(), round(float(least.at[12, "w"]), 3)
        ([False, False, True], 0.855)
    """
    beyond = pd.DataFrame(False, index=wide.index, columns=wide.columns)
    least = pd.DataFrame(np.nan, index=wide.index, columns=wide.columns)
    for floor in set(v_decay.values()):
        names = [n for n in wide.columns if v_decay.get(n) == floor]
        if names:
            _, gap, fell = _falls(wide[names], floor)
            beyond[names] = fell
            least[names] = (wide[names].shift(1).ffill() * floor**gap).where(fell)
    return beyond, least


def _beyond_updates(wide: pd.DataFrame) -> pd.DataFrame:
    """Per measured step and tensor: the second moment fell below what updates allow since its
    measurement before (`_falls`)."""
    return _falls(wide)[2]


def _fall_beyond_updates(column: pd.Series, seen: int, floor: float = V_DECAY_FLOOR) -> tuple[float, int] | None:
    """(ratio, steps) when a second moment's mean at measured step `seen` fell below what Adam-family
    updates allow since the measurement before it (`_falls`); None otherwise.

    Example:
        >>> ratio, steps = _fall_beyond_updates(pd.Series([1.0, 0.98, 0.01], index=[10, 11, 12]), 12)
        >>> round(ratio, 4), steps
        (0.0102, 1)
    """
    ratio, gap, beyond = _falls(column.to_frame(), floor)
    if seen not in ratio.index or not bool(beyond.loc[seen].iloc[0]):
        return None
    return float(ratio.loc[seen].iloc[0]), int(gap.loc[seen].iloc[0])


def _when(wide: pd.DataFrame, seen: int) -> tuple[int, str]:
    """The step a state change is dated to (the earliest it can have happened) and how to say it."""
    start = _gap_start(wide, seen)
    if start >= seen:
        return seen, f"from step {seen}"
    return start, f"between steps {start} and {seen} (no state statistics in between)"


def _rate_z(wide: pd.DataFrame, base_steps: np.ndarray, steps: np.ndarray, lag: int, floor: float) -> np.ndarray:
    """Robust z of each tensor's change over `lag` logged steps at `steps`, against the same change
    over its baseline steps (steps x tensors; NaN where unknown)."""
    change = wide - wide.shift(lag)
    # Only where those logged steps are spaced as the statistics usually are (at most twice the median
    # spacing): across a gap (a cost budget's light steps after a dense warmup) the change spans many
    # more steps, and a state that drifted there did not move suddenly.
    measured = wide.index.to_numpy()
    if len(measured) > lag:
        apart = np.r_[np.full(lag, np.inf), measured[lag:] - measured[:-lag]]
        change.loc[apart > 2 * lag * float(np.median(np.diff(measured)))] = np.nan
    base = change.loc[change.index.isin(base_steps)].to_numpy(dtype=float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(base, axis=0)
        sigma = np.fmax(MAD_TO_SIGMA * np.nanmedian(np.abs(base - center), axis=0), floor)
        return (change.reindex(steps).to_numpy(dtype=float) - center) / sigma


def _split(wide: pd.DataFrame, base_steps: np.ndarray, scan_steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline rows, scan rows (steps x tensors, float) and the scan rows' steps of a wide table."""
    values, index = wide.to_numpy(dtype=float), wide.index.to_numpy()
    scan = np.isin(index, scan_steps)
    return values[np.isin(index, base_steps)], values[scan], index[scan]


def nan_max(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan
