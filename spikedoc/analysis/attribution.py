"""Layer attribution: which tensors an incident points at, and optimizer-state precursors.

A pure function of a window of the layer table around one incident. Batch attribution lives in
`spikedoc.analysis.batches` and is re-exported here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import LOG10_SIGMA_FLOOR, MAD_TO_SIGMA, fmt, steps_text
from spikedoc._module_kinds import MODULE_KINDS, module_kind, module_kinds
from spikedoc.analysis.batches import BatchProfile, attribute_batches, batch_profile, hash_history
from spikedoc.analysis.config import AnalysisConfig

__all__ = [
    "BatchProfile",
    "batch_profile",
    "hash_history",
    "attribute_batches",
    "LayerAttribution",
    "attribute_layers",
    "module_kind",
    "module_kinds",
    "MODULE_KINDS",
]

# eps_frac must rise by at least this absolute share of elements to count as a precursor.
_EPS_FRAC_RISE = 0.05
# Smallest sigma of eps_frac (a share of elements) believed: half a percent of the tensor.
_EPS_FRAC_SIGMA_FLOOR = 0.005
# exp_avg_sq_mean at or below this share of its history counts as a collapse (one decade).
_V_COLLAPSE = 0.1
# Fewer logged steps than this before the scan window: no per-tensor baseline.
_MIN_HISTORY = 8
# An Adam-family update shrinks a second moment by at most its beta2 per step (v = beta2 v + (1 - beta2) g^2);
# 0.9 is the lowest beta2 in common use (0.95 to 0.999 in LLM recipes), so a fall below 0.9 ** steps
# between two measurements is no update's doing: the state was written from outside the optimizer.
_V_DECAY_FLOOR = 0.9




@dataclass(kw_only=True)
class LayerAttribution:
    """Per-tensor findings for one incident (see `attribute_layers`)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    """Implicated tensors: `name`, `module`, `z`, `grad_z`, `update_z`, `lead_steps`, `departed_step`."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Per module kind: `module`, `tensors`, `departed`, `max_z`, `lead_steps`."""
    precursors: list[dict[str, Any]] = field(default_factory=list)
    """Optimizer-state precursors: `name`, `kind` (eps_frac_rise, exp_avg_sq_collapse,
    update_without_grad), `before`, `value`, `step`, `lead_steps`, `at_onset` (the change is seen
    within `sudden_steps` of the loss flag: the state departing there, what an `optimizer_state`
    cause needs, rather than an earlier drift), `sentence`."""
    earliest_step: int | None = None
    """Earliest departure of any tensor (or precursor) at or before the reference step."""
    history_steps: int = 0
    """Logged steps in each tensor's baseline."""
    median_update_ratio: float = math.nan
    """Median over tensors of update_ratio at the onset step."""
    nonfinite_params: tuple[int, list[str]] | None = None
    """(step, names): the first logged step where some (at most half) of the parameter norms are
    non-finite, and those tensors."""
    nonfinite_grads: tuple[int, list[str], int] | None = None
    """(step, names, tensors logged): the first logged step with a non-finite gradient norm, the
    tensors whose gradient was non-finite there, and how many tensors that step logged."""


def attribute_layers(
    layers: pd.DataFrame,
    *,
    onset: int,
    peak: int,
    reference: int,
    module_types: dict[str, str] | None = None,
    config: AnalysisConfig | None = None,
) -> LayerAttribution:
    """Score each tensor at the incident against its own history before it.

    Args:
        layers: layer-table rows (long format) from `onset - lookback - layer_history` to the end
            (rows past the peak are read only for optimizer-state statistics that skipped the onset).
        onset: the incident's first flagged step.
        peak: the incident's peak step (z-scores are the max over onset..peak).
        reference: the step leads are measured to (the first loss flag; onset if the loss never flagged).
        module_types: parameter name -> module class name, from meta.json.
        config: thresholds and windows.

    Example:
        >>> import pandas as pd
        >>> rows = [{"step": s, "name": "h.0.mlp.c_fc.weight", "grad_norm": 1.0 + 0.01 * (s % 3)} for s in range(60)]
        >>> rows[-1]["grad_norm"] = 50.0
        >>> attribute_layers(pd.DataFrame(rows), onset=59, peak=59, reference=59).layers[0]["module"]
        'mlp'
    """
    config = config or AnalysisConfig()
    module_types = module_types or {}
    result = LayerAttribution()
    if layers is None or layers.empty:
        return result
    state_layers = layers  # the state statistics may be read past the peak, up to the first measured step
    layers = layers.loc[layers["step"] <= max(peak, onset)]
    result.nonfinite_params = _nonfinite_params(layers)
    result.nonfinite_grads = _first_nonfinite(layers, "grad_norm")
    steps = np.sort(layers["step"].unique())
    pre = steps[steps < onset]
    scan_start = onset - config.lookback
    if (pre < scan_start).sum() < _MIN_HISTORY:
        # Short history: the first two thirds of what exists form the baseline, the rest is scanned.
        scan_start = int(pre[(2 * len(pre)) // 3]) if len(pre) >= _MIN_HISTORY else onset
    base_steps = pre[pre < scan_start]
    result.history_steps = int(len(base_steps))
    if len(base_steps) < _MIN_HISTORY:
        return result
    scan_steps = steps[steps >= scan_start]
    z = {}
    for metric in ("grad_norm", "update_ratio"):
        if metric in layers.columns:
            z[metric] = _log_z(layers, metric, base_steps, scan_steps)
    if not z:
        return result
    names = sorted(set().union(*(frame.columns for frame in z.values())))
    incident = (scan_steps >= onset) & (scan_steps <= max(peak, onset))
    kinds = module_kinds(names, module_types)
    rows = []
    for name in names:
        per = {m: frame[name].to_numpy() if name in frame.columns else np.full(len(scan_steps), np.nan) for m, frame in z.items()}
        combined = np.fmax(per.get("grad_norm", np.nan), per.get("update_ratio", np.nan))
        at = _nanmax(combined[incident])
        if not at >= config.z_threshold:
            continue
        departed = _departure(combined, scan_steps, onset, config.z_threshold)
        rows.append({
            "name": name,
            "module": kinds[name],
            "z": at,
            "grad_z": _nanmax(per["grad_norm"][incident]) if "grad_norm" in per else math.nan,
            "update_z": _nanmax(per["update_ratio"][incident]) if "update_ratio" in per else math.nan,
            "departed_step": departed,
            "lead_steps": max(0, reference - departed) if departed is not None else None,
        })
    rows.sort(key=lambda r: (r["departed_step"] if r["departed_step"] is not None else onset, -_finite_or(r["z"], 1e300)))
    result.layers = rows[: config.max_layers]
    result.groups = _groups(rows, names, module_types)
    window = _Window(base_steps=base_steps, scan_steps=scan_steps, onset=onset, peak=peak, reference=reference)
    result.precursors = _optimizer_precursors(state_layers, window, rows, config)
    departures = [r["departed_step"] for r in rows if r["departed_step"] is not None]
    departures += [p["step"] for p in result.precursors if p["step"] is not None and p["step"] <= reference]
    result.earliest_step = int(min(departures)) if departures else None
    if "update_ratio" in layers.columns:
        at_onset = layers.loc[layers["step"] == onset, "update_ratio"].to_numpy(dtype=float)
        at_onset = at_onset[np.isfinite(at_onset)]
        result.median_update_ratio = float(np.median(at_onset)) if at_onset.size else math.nan
    return result


def _nonfinite_params(layers: pd.DataFrame) -> tuple[int, list[str]] | None:
    """First step with non-finite parameter norms, and which tensors, when they are a minority.

    A NaN row is data here (the row was written, its value is NaN). When every tensor goes
    non-finite in the same step (a NaN gradient reaches all of them), naming them says nothing.
    """
    found = _first_nonfinite(layers, "param_norm")
    if found is None:
        return None
    first, names, total = found
    return (first, names) if len(names) <= total // 2 else None


def _first_nonfinite(layers: pd.DataFrame, column: str) -> tuple[int, list[str], int] | None:
    """First step where some tensor's `column` is non-finite: (step, those tensors, tensors logged there)."""
    if column not in layers.columns:
        return None
    bad = layers.loc[~np.isfinite(layers[column].to_numpy(dtype=float))]  # a NaN row is data: the value was NaN
    if bad.empty:
        return None
    first = int(bad["step"].min())
    names = sorted(bad.loc[bad["step"] == first, "name"].astype(str).unique().tolist())
    return first, names, int(layers.loc[layers["step"] == first, "name"].nunique())


def _wide(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """steps x tensors table of one metric (NaN where a tensor was not logged)."""
    frame = layers[["step", "name", metric]].copy()
    frame["name"] = frame["name"].astype(str)
    frame = frame.drop_duplicates(["step", "name"], keep="last")
    return frame.set_index(["step", "name"])[metric].astype(float).unstack("name").sort_index()


def _state_table(layers: pd.DataFrame, metric: str, onset: int, scan_steps: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """An optimizer-state metric on the steps that measured it, and the scan steps up to `onset`.

    Under a cost budget the state statistics come every few steps: changes are then taken between
    measured steps, and when `onset` itself was not measured the scan runs on to the first step
    that was. The state changes judged here (a second moment collapsing, the eps-dominated share
    rising) go the other way from what a spike's large gradients do to the state, so seen first
    after onset they still happened before it, in the gap.
    """
    wide = _wide(layers, metric)
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


def _log_z(layers: pd.DataFrame, metric: str, base_steps: np.ndarray, scan_steps: np.ndarray) -> pd.DataFrame:
    """Per-tensor robust z of log10(metric) on scan steps against the baseline steps.

    A non-finite value (NaN/inf gradient) gets z = inf: the most extreme departure there is.
    """
    wide = _wide(layers, metric)
    present = layers[["step", "name"]].assign(name=lambda f: f["name"].astype(str), _one=1.0)
    present = present.drop_duplicates(["step", "name"]).set_index(["step", "name"])["_one"].unstack("name")
    present = present.reindex(index=wide.index, columns=wide.columns).notna().to_numpy()
    values = wide.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(values > 0, values, np.nan))
    index = wide.index.to_numpy()
    base = logs[np.isin(index, base_steps)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tensors without history keep z = NaN
        center = np.nanmedian(base, axis=0)
        sigma = np.fmax(MAD_TO_SIGMA * np.nanmedian(np.abs(base - center), axis=0), LOG10_SIGMA_FLOOR)
    # A tensor with few values in the baseline (sparse layer statistics: `layer_every`, a cost
    # budget) has no robust sigma: its z would be an artefact of the floor, so it is not judged.
    center = np.where(_history_count(base) >= _MIN_HISTORY, center, np.nan)
    scan = np.isin(index, scan_steps)
    with np.errstate(all="ignore"):
        z = (logs[scan] - center) / sigma
    nonfinite = present[scan] & ~np.isfinite(values[scan])
    if metric != "grad_norm":
        # Under a cost budget a step may lack the full statistics: its update ratios are null for
        # every tensor, not measured as NaN. Only an inf, or a NaN on a step that measured others, is non-finite.
        measured = np.isfinite(values[scan]).any(axis=1, keepdims=True)
        nonfinite &= measured | np.isinf(values[scan])
    z = np.where(nonfinite, np.inf, z)
    return pd.DataFrame(z, index=wide.index[scan], columns=wide.columns).reindex(scan_steps)


def _history_count(base: np.ndarray) -> np.ndarray:
    """Finite baseline values per tensor (column)."""
    return np.isfinite(np.asarray(base, dtype=float)).sum(axis=0)


def _departure(z: np.ndarray, steps: np.ndarray, onset: int, threshold: float) -> int | None:
    """First step from which z stays off: >= threshold there and >= threshold/2 until onset."""
    start = None
    for i, step in enumerate(steps):
        value = z[i]
        if value >= threshold and start is None:
            start = int(step)
        elif start is not None and step < onset and not value >= threshold / 2:
            start = None  # returned to normal before onset: an earlier blip, not the departure
        if step >= onset and start is not None:
            break
    return start


def _groups(rows: list[dict[str, Any]], names: list[str], module_types: dict[str, str]) -> list[dict[str, Any]]:
    totals: dict[str, int] = {}
    for kind in module_kinds(names, module_types).values():
        totals[kind] = totals.get(kind, 0) + 1
    groups = []
    for kind in MODULE_KINDS:
        members = [r for r in rows if r["module"] == kind]
        if kind not in totals:
            continue
        leads = [r["lead_steps"] for r in members if r["lead_steps"] is not None]
        groups.append({
            "module": kind,
            "tensors": totals[kind],
            "departed": len(members),
            "max_z": max((r["z"] for r in members), default=None),
            "top": members[0]["name"] if members else None,
            "lead_steps": max(leads) if leads else None,
        })
    return groups


@dataclass(frozen=True, kw_only=True)
class _Window:
    """The steps one incident's per-tensor scores are computed over."""

    base_steps: np.ndarray
    """Logged steps of each tensor's baseline (before the scan)."""
    scan_steps: np.ndarray
    """Logged steps scanned for departures (lookback window to the peak)."""
    onset: int
    peak: int
    reference: int
    """The step leads are measured to."""


def _optimizer_precursors(layers: pd.DataFrame, window: _Window, rows: list[dict[str, Any]],
                          config: AnalysisConfig) -> list[dict[str, Any]]:  # fmt: skip
    """Optimizer-state changes before onset that are anomalous against the tensor's own variation.

    A level far from the tensor's history is not enough: healthy runs drift (a bias tensor's
    second moment can fall 20x over a few hundred steps as its gradient shrinks). A precursor also
    changes at a rate its history never showed: its change over `config.sudden_steps` logged steps
    is `z_threshold` robust sigmas off the same change measured over its baseline. And it is dated
    inside the scan window: a change first seen after a gap in the state statistics that reaches
    back before the window (a cost budget's sparse steps early in a run) could be the slow early
    decline every run shows, spread over the gap.
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
            center = np.where(_history_count(finite_base) >= _MIN_HISTORY, np.nanmedian(finite_base, axis=0), np.nan)
            sigma = np.fmax(MAD_TO_SIGMA * np.nanmedian(np.abs(finite_base - center), axis=0), _EPS_FRAC_SIGMA_FLOOR)
            level = (scan - center >= _EPS_FRAC_RISE) & ((scan - center) / sigma >= config.z_threshold)
        hits = level & (_rate_z(wide, base_steps, steps, config.sudden_steps, _EPS_FRAC_SIGMA_FLOOR) >= config.z_threshold)
        for j in np.flatnonzero(hits.any(axis=0) & np.isfinite(center)):
            name, seen, value, before = wide.columns[j], int(steps[hits[:, j].argmax()]), _nanmax(scan[:, j]), float(center[j])
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
            center = np.where(_history_count(base) >= _MIN_HISTORY, np.nanmedian(base, axis=0), np.nan)
            level = (scan / center <= _V_COLLAPSE) & (center > 0)
            logs = np.log10(np.where(wide > 0, wide, np.nan))
        falling = -_rate_z(pd.DataFrame(logs, index=wide.index, columns=wide.columns), base_steps, steps,
                           config.sudden_steps, LOG10_SIGMA_FLOOR)
        hits = level & (falling >= config.z_threshold)
        for j in np.flatnonzero(hits.any(axis=0)):
            name, seen, before = wide.columns[j], int(steps[hits[:, j].argmax()]), float(center[j])
            step, when = _when(wide, seen)
            if step < scan_steps[0]:
                continue  # as above: not dated inside the window
            low = float(np.nanmin(scan[:, j]))
            fell = _fall_beyond_updates(wide[name], seen)
            found.append({
                "name": name, "kind": "exp_avg_sq_collapse", "before": before, "value": low, "step": step,
                "lead_steps": max(0, reference - step), "at_onset": bool(hits[steps >= reference - config.sudden_steps, j].any()),
                "overwritten": fell is not None,
                "sentence": f"exp_avg_sq of {name} collapsed to {fmt(low / before, 2)}x its history "
                f"({fmt(before)} -> {fmt(low)}) {when}, faster than it ever moved before"
                + (f"; it fell to {fmt(fell[0], 2)}x in {steps_text(fell[1])}, below the {fmt(_V_DECAY_FLOOR ** fell[1], 2)}x "
                   "Adam's updates allow (beta2 >= 0.9 per step): the state was written from outside the optimizer"
                   if fell is not None else ""),
            })
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


def _fall_beyond_updates(column: pd.Series, seen: int) -> tuple[float, int] | None:
    """(ratio, steps) when a second moment's mean at measured step `seen` fell below what Adam-family
    updates allow since the measurement before it (`_V_DECAY_FLOOR ** steps` of it); None otherwise.

    Example:
        >>> _fall_beyond_updates(pd.Series([1.0, 0.98, 0.01], index=[10, 11, 12]), 12)
        (0.01020408163265306, 1)
    """
    before = column.loc[column.index < seen].dropna()
    now = float(column.get(seen, np.nan))
    if before.empty or not np.isfinite(now) or not float(before.iloc[-1]) > 0:
        return None
    gap, ratio = seen - int(before.index[-1]), now / float(before.iloc[-1])
    # The statistics are stored as float32: a fall of exactly beta2 per step must not read as more.
    return (ratio, gap) if ratio < _V_DECAY_FLOOR**gap * (1 - 1e-4) else None


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


def _nanmax(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
