"""Layer attribution: which tensors an incident points at (its optimizer-state precursors: `state_precursors`).

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

from spikedoc.analysis._robust import LOG10_SIGMA_FLOOR, MAD_TO_SIGMA
from spikedoc._module_kinds import MODULE_KINDS, module_kind, module_kinds
from spikedoc.analysis.batches import BatchProfile, attribute_batches, batch_profile, hash_history
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.state_precursors import MIN_HISTORY, Window, history_count, nan_max, optimizer_precursors, wide_table

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

@dataclass(kw_only=True)
class LayerAttribution:
    """Per-tensor findings for one incident (see `attribute_layers`)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    """Implicated tensors: `name`, `module`, `z`, `grad_z`, `grad_z_finite`, `update_z`, `lead_steps`,
    `departed_step`. `grad_z` is the largest gradient z in the incident, inf where the gradient went
    non-finite; `grad_z_finite` the largest over its finite gradients only (how far the gradient grew
    before it broke; NaN when none was finite)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Per module kind: `module`, `tensors`, `departed`, `max_z`, `lead_steps`."""
    precursors: list[dict[str, Any]] = field(default_factory=list)
    """Optimizer-state precursors: `name`, `kind` (eps_frac_rise, exp_avg_sq_collapse, momentum_jump,
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
    gradient_decay: dict[str, float] | None = None,
    v_decay: dict[str, float] | None = None,
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
        gradient_decay: parameter name -> weight decay coupled into its gradient (0 when decoupled),
            from meta.json: first moments are held to what their updates allow (`optimizer_precursors`).
        v_decay: parameter name -> its Adam beta2 (at most 0.9), from meta.json: second moments are
            held to the fall their updates allow.

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
    if (pre < scan_start).sum() < MIN_HISTORY:
        # Short history: the first two thirds of what exists form the baseline, the rest is scanned.
        scan_start = int(pre[(2 * len(pre)) // 3]) if len(pre) >= MIN_HISTORY else onset
    base_steps = pre[pre < scan_start]
    result.history_steps = int(len(base_steps))
    if len(base_steps) < MIN_HISTORY:
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
        at = nan_max(combined[incident])
        if not at >= config.z_threshold:
            continue
        departed = _departure(combined, scan_steps, onset, config.z_threshold)
        rows.append({
            "name": name,
            "module": kinds[name],
            "z": at,
            "grad_z": nan_max(per["grad_norm"][incident]) if "grad_norm" in per else math.nan,
            "grad_z_finite": _finite_max(per["grad_norm"][incident]) if "grad_norm" in per else math.nan,
            "update_z": nan_max(per["update_ratio"][incident]) if "update_ratio" in per else math.nan,
            "departed_step": departed,
            "lead_steps": max(0, reference - departed) if departed is not None else None,
        })
    rows.sort(key=lambda r: (r["departed_step"] if r["departed_step"] is not None else onset, -_finite_or(r["z"], 1e300)))
    result.layers = rows[: config.max_layers]
    result.groups = _groups(rows, names, module_types)
    window = Window(base_steps=base_steps, scan_steps=scan_steps, onset=onset, peak=peak, reference=reference)
    result.precursors = optimizer_precursors(state_layers, window, rows, config, gradient_decay, v_decay)
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
    non-finite in the same step (a NaN gradient reaches all of them), naming them says nothing; such
    steps are passed over, and so are a cost budget's light steps, which measure no parameter norm.
    """
    if "param_norm" not in layers.columns:
        return None
    measured = layers["step"].isin(layers.loc[layers["param_norm"].notna(), "step"].unique())
    found = _first_nonfinite(layers.loc[measured], "param_norm")
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


def _log_z(layers: pd.DataFrame, metric: str, base_steps: np.ndarray, scan_steps: np.ndarray) -> pd.DataFrame:
    """Per-tensor robust z of log10(metric) on scan steps against the baseline steps.

    A non-finite value (NaN/inf gradient) gets z = inf: the most extreme departure there is.
    """
    wide = wide_table(layers, metric)
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
    center = np.where(history_count(base) >= MIN_HISTORY, center, np.nan)
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


def _finite_max(values: np.ndarray) -> float:
    """Largest finite value (NaN when none): a non-finite z is a value that broke, not one that grew."""
    values = np.asarray(values, dtype=float)
    return nan_max(values[np.isfinite(values)])


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default
