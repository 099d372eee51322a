"""Attribution: which batch and which tensors an incident points at, and optimizer-state precursors.

Everything here is a pure function of DataFrames: the step table (for batch fingerprints) and a
window of the layer table around one incident.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import fmt, robust_center_scale, robust_z
from spikedoc.analysis.config import AnalysisConfig

__all__ = [
    "BatchProfile",
    "batch_profile",
    "hash_history",
    "attribute_batches",
    "LayerAttribution",
    "attribute_layers",
    "module_kind",
    "MODULE_KINDS",
]

#: Module groups, in display order.
MODULE_KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")

# Name fragments per module kind, checked in this order (attention before mlp: "attn.c_proj").
_NAME_RULES = (
    ("norms", re.compile(r"(^|[._])(ln|ln_f|ln_\d+|norm\w*|\w*norm|layernorm|rmsnorm|bn\d*)([._]|$)", re.I)),
    ("embeddings", re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|position_emb|word_emb)", re.I)),
    ("head", re.compile(r"(^|[._])(lm_head|head|classifier|output|score)([._]|$)", re.I)),
    ("attention", re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value)", re.I)),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|feedforward|c_fc|fc\d*|up_proj|down_proj|gate_proj|w[123]|intermediate)", re.I)),
)

# Batch statistics compared with the run's distribution: column -> (what it is, direction checked).
_BATCH_STATS = {
    "seq_len_median": ("median sequence length", "both"),
    "seq_len_max": ("longest sequence", "high"),
    "distinct_token_ratio": ("distinct-token ratio", "low"),
    "tokens": ("tokens in the step", "both"),
}

# Per-tensor z-scores are computed on log10 values with sigma floored here (~5% relative), so a
# tensor that is unusually steady does not call a 10% wobble a departure.
_LOG_SIGMA_FLOOR = 0.02
# eps_frac must rise by at least this absolute share of elements to count as a precursor.
_EPS_FRAC_RISE = 0.05
# exp_avg_sq_mean at or below this share of its history counts as a collapse (one decade).
_V_COLLAPSE = 0.1
# Rows sampled for the distribution of per-batch worst-sample ratios.
_PROFILE_ROWS = 20_000
# Fewer logged steps than this before the scan window: no per-tensor baseline.
_MIN_HISTORY = 8


# --------------------------------------------------------------------------------------- batches


@dataclass(kw_only=True)
class BatchProfile:
    """The run's distribution of batch statistics: column -> (median, robust sigma)."""

    stats: dict[str, tuple[float, float]] = field(default_factory=dict)


def batch_profile(steps: pd.DataFrame) -> BatchProfile:
    """Median and robust sigma of each batch statistic present in `steps` (all ranks' rows).

    Besides the recorded columns, `worst_sample_ratio`: median and robust sigma of the log of each
    batch's largest sample loss over its median sample loss, from `sample_losses` (on a fixed
    sample of at most 20,000 rows: a distribution needs no more, and a million lists cost seconds).
    """
    profile = BatchProfile()
    for column in _BATCH_STATS:
        if column in steps.columns:
            values = pd.to_numeric(steps[column], errors="coerce").to_numpy(dtype=float)
            center, sigma = robust_center_scale(values, rel_floor=0.01)
            if math.isfinite(center):
                profile.stats[column] = (center, sigma)
    if "sample_losses" in steps.columns:
        lists = steps["sample_losses"].dropna()
        if len(lists) > _PROFILE_ROWS:
            lists = lists.sample(_PROFILE_ROWS, random_state=0)
        ratios = np.array([_worst_ratio(np.asarray(v, dtype=float)) for v in lists], dtype=float)
        # A maximum is right-skewed; its logarithm is close to symmetric, so the z-score is taken there.
        center, sigma = robust_center_scale(np.log(ratios[ratios > 0]))
        if math.isfinite(center):
            profile.stats["worst_sample_ratio"] = (center, sigma)
    return profile


def _worst_ratio(losses: np.ndarray) -> float:
    losses = losses[np.isfinite(losses)]
    if losses.size < 2:
        return math.nan
    median = float(np.median(losses))
    return float(losses.max()) / median if median > 0 else math.nan


def attribute_batches(
    rows: pd.DataFrame,
    *,
    profile: BatchProfile,
    hashes: dict[str, Any] | None = None,
    config: AnalysisConfig | None = None,
) -> list[dict[str, Any]]:
    """Describe the batches of `rows` (the candidate onset steps, one row per rank and step).

    Args:
        rows: step-table rows of the candidate steps.
        profile: the run's batch statistics (`batch_profile`).
        hashes: `hash_history` of the lineage the steps belong to (None: repeats are not checked).
        config: thresholds.

    Returns:
        One dict per row: `step`, `segment`, `rank`, `sample_ids`, `positions`, `batch_hash`,
        `input_shapes`, `stats`, `anomalies` (sentences), `flags` (short ids), `worst_samples`,
        `outlier_sample_ids`, `repeat_of_step`.

    Example:
        >>> import pandas as pd
        >>> run = pd.DataFrame({"step": range(100), "seq_len_median": [100.0] * 99 + [400.0]})
        >>> batches = attribute_batches(run.tail(1), profile=batch_profile(run))
        >>> batches[0]["anomalies"][0]
        "median sequence length 400 is 4x the run's median (100)"
    """
    config = config or AnalysisConfig()
    hashes = hashes or {"first": {}, "repeat_share": math.nan}
    out = []
    for _, row in rows.iterrows():
        batch = _fingerprint(row)
        for column, (what, direction) in _BATCH_STATS.items():
            if column not in profile.stats or column not in row.index:
                continue
            sentence, flag = _stat_anomaly(column, what, direction, _num(row[column]), profile.stats[column], config)
            if sentence:
                batch["anomalies"].append(sentence)
                batch["flags"].append(flag)
        _repeat(batch, hashes)
        _samples(batch, row, profile, config)
        out.append(batch)
    return out


def _fingerprint(row: pd.Series) -> dict[str, Any]:
    ids = row.get("sample_ids")
    ids = [str(i) for i in ids] if ids is not None and not _is_missing(ids) else []
    positions = None
    offset, samples = _num(row.get("sample_offset")), _num(row.get("samples"))
    if math.isfinite(offset) and math.isfinite(samples):
        positions = [int(offset), int(offset + samples)]
    stats = {c: _num(row.get(c)) for c in _BATCH_STATS if c in row.index and math.isfinite(_num(row.get(c)))}
    return {
        "step": int(row["step"]),
        "segment": int(row["segment"]) if "segment" in row.index and math.isfinite(_num(row["segment"])) else 0,
        "rank": int(row["rank"]) if "rank" in row.index and math.isfinite(_num(row["rank"])) else 0,
        "sample_ids": ids,
        "positions": positions,
        "batch_hash": None if _is_missing(row.get("batch_hash")) else str(row.get("batch_hash")),
        "input_shapes": None if _is_missing(row.get("input_shapes")) else str(row.get("input_shapes")),
        "stats": stats,
        "anomalies": [],
        "flags": [],
        "worst_samples": [],
        "outlier_sample_ids": [],
        "repeat_of_step": None,
    }


def _stat_anomaly(column, what, direction, value, center_sigma, config) -> tuple[str | None, str | None]:
    center, sigma = center_sigma
    if not math.isfinite(value) or not math.isfinite(center) or center <= 0:
        return None, None
    z = robust_z(value, center, sigma)
    ratio = value / center
    high = direction in ("high", "both") and z >= config.z_threshold and ratio >= config.batch_ratio
    low = direction in ("low", "both") and z <= -config.z_threshold and ratio <= 1 / config.batch_ratio
    if column == "distinct_token_ratio" and value <= config.near_constant_ratio and ratio < 1:
        return f"distinct-token ratio {fmt(value, 2)}: near-constant input (run's median {fmt(center, 2)})", "near_constant"
    if high:
        return f"{what} {fmt(value)} is {fmt(ratio, 2)}x the run's median ({fmt(center)})", f"high_{column}"
    if low:
        return f"{what} {fmt(value)} is {fmt(ratio, 2)}x the run's median ({fmt(center)})", f"low_{column}"
    return None, None


def hash_history(lineage_rows: pd.DataFrame) -> dict[str, Any]:
    """First step of each content hash in a lineage's step rows, and the share of repeated batches."""
    if "batch_hash" not in lineage_rows.columns:
        return {"first": {}, "repeat_share": math.nan}
    rows = lineage_rows.loc[lineage_rows["batch_hash"].notna(), ["step", "batch_hash"]].sort_values("step", kind="stable")
    if rows.empty:
        return {"first": {}, "repeat_share": math.nan}
    first = rows.drop_duplicates("batch_hash").set_index("batch_hash")["step"]
    return {"first": first, "repeat_share": float(rows["batch_hash"].duplicated().mean())}


def _repeat(batch: dict[str, Any], hashes: dict[str, Any]) -> None:
    first = hashes["first"]
    key = batch["batch_hash"]
    if key is None or len(first) == 0 or key not in first.index:
        return
    seen = int(first[key])
    if seen >= batch["step"]:
        return
    batch["repeat_of_step"] = seen
    share = hashes["repeat_share"]
    # Multi-epoch runs repeat every batch; a repeat is only anomalous when the run rarely repeats.
    if share < 0.01:
        batch["anomalies"].append(f"content hash seen before at step {seen}: repeated data")
        batch["flags"].append("repeated")


def _samples(batch: dict[str, Any], row: pd.Series, profile: BatchProfile, config: AnalysisConfig) -> None:
    losses = row.get("sample_losses")
    if losses is None or _is_missing(losses):
        return
    losses = np.asarray(list(losses), dtype=float)
    ids = batch["sample_ids"] or [f"pos:{batch['positions'][0] + i}" if batch["positions"] else str(i) for i in range(len(losses))]
    if len(ids) != len(losses) or losses.size == 0:
        return
    order = np.argsort(np.where(np.isfinite(losses), losses, np.inf))[::-1]
    batch["worst_samples"] = [{"id": ids[i], "loss": float(losses[i])} for i in order[:3]]
    # A batch always has a worst sample; it is news only when it stands out more than the worst
    # sample of the run's batches usually does (their max/median ratio, in `profile`).
    if "worst_sample_ratio" not in profile.stats:
        return
    log_typical, log_spread = profile.stats["worst_sample_ratio"]
    typical = math.exp(log_typical)
    median = float(np.median(losses[np.isfinite(losses)])) if np.isfinite(losses).any() else math.nan
    if not median > 0:
        return
    ratio = losses / median
    cut = max(config.batch_ratio * typical, math.exp(log_typical + config.z_threshold * log_spread))
    outliers = [i for i in order if not math.isfinite(losses[i]) or ratio[i] >= cut]
    if outliers and len(outliers) <= len(losses) // 2:
        batch["outlier_sample_ids"] = [ids[i] for i in outliers]
        worst = outliers[0]
        batch["anomalies"].append(
            f"sample {ids[worst]} has loss {fmt(losses[worst])}, {fmt(ratio[worst], 2)}x the batch's median sample "
            f"loss ({fmt(median)}); the run's batches top out at {fmt(typical, 2)}x"
            + (f"; {len(outliers)} such samples" if len(outliers) > 1 else "")
        )
        batch["flags"].append("outlier_samples")


# ---------------------------------------------------------------------------------------- layers


@dataclass(kw_only=True)
class LayerAttribution:
    """Per-tensor findings for one incident (see `attribute_layers`)."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    """Implicated tensors: `name`, `module`, `z`, `grad_z`, `update_z`, `lead_steps`, `departed_step`."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Per module kind: `module`, `tensors`, `departed`, `max_z`, `lead_steps`."""
    precursors: list[dict[str, Any]] = field(default_factory=list)
    """Optimizer-state precursors: `name`, `kind` (eps_frac_rise, exp_avg_sq_collapse,
    update_without_grad), `before`, `value`, `step`, `lead_steps`, `sentence`."""
    earliest_step: int | None = None
    """Earliest departure of any tensor (or precursor) at or before the reference step."""
    history_steps: int = 0
    """Logged steps in each tensor's baseline."""
    median_update_ratio: float = math.nan
    """Median over tensors of update_ratio at the onset step."""
    nonfinite_params: tuple[int, list[str]] | None = None
    """(step, names): the first logged step where some (at most half) of the parameter norms are
    non-finite, and those tensors."""


def module_kind(name: str, module_type: str | None = None) -> str:
    """Module group of a parameter from its module type (when known) and its name.

    Example:
        >>> module_kind("transformer.h.0.attn.c_attn.weight")
        'attention'
        >>> module_kind("blocks.1.ln_1.weight", "LayerNorm")
        'norms'
    """
    kind = (module_type or "").lower()
    if "embedding" in kind:
        return "embeddings"
    if "norm" in kind:
        return "norms"
    if "attention" in kind:
        return "attention"
    for group, pattern in _NAME_RULES:
        if pattern.search(name):
            return group
    return "other"


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
        layers: layer-table rows (long format) from `onset - lookback - layer_history` to the end.
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
    layers = layers.loc[layers["step"] <= max(peak, onset)]
    result.nonfinite_params = _nonfinite_params(layers)
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
            "module": module_kind(name, module_types.get(name)),
            "z": at,
            "grad_z": _nanmax(per["grad_norm"][incident]) if "grad_norm" in per else math.nan,
            "update_z": _nanmax(per["update_ratio"][incident]) if "update_ratio" in per else math.nan,
            "departed_step": departed,
            "lead_steps": max(0, reference - departed) if departed is not None else None,
        })
    rows.sort(key=lambda r: (r["departed_step"] if r["departed_step"] is not None else onset, -_finite_or(r["z"], 1e300)))
    result.layers = rows[: config.max_layers]
    result.groups = _groups(rows, names, module_types)
    result.precursors = _optimizer_precursors(layers, base_steps, scan_steps, onset, peak, reference, rows, config)
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
    if "param_norm" not in layers.columns:
        return None
    bad = layers.loc[~np.isfinite(layers["param_norm"].to_numpy(dtype=float))]
    if bad.empty:
        return None
    first = int(bad["step"].min())
    names = sorted(bad.loc[bad["step"] == first, "name"].astype(str).unique().tolist())
    total = layers.loc[layers["step"] == first, "name"].nunique()
    return (first, names) if len(names) <= total // 2 else None


def _wide(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """steps x tensors table of one metric (NaN where a tensor was not logged)."""
    frame = layers[["step", "name", metric]].copy()
    frame["name"] = frame["name"].astype(str)
    frame = frame.drop_duplicates(["step", "name"], keep="last")
    return frame.set_index(["step", "name"])[metric].astype(float).unstack("name").sort_index()


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
        sigma = np.fmax(1.4826 * np.nanmedian(np.abs(base - center), axis=0), _LOG_SIGMA_FLOOR)
    scan = np.isin(index, scan_steps)
    with np.errstate(all="ignore"):
        z = (logs[scan] - center) / sigma
    nonfinite = present[scan] & ~np.isfinite(values[scan])
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
    for name in names:
        kind = module_kind(name, module_types.get(name))
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


def _optimizer_precursors(layers, base_steps, scan_steps, onset, peak, reference, rows, config) -> list[dict[str, Any]]:
    found = []
    before = scan_steps[scan_steps <= max(onset, peak)]
    if "eps_frac" in layers.columns:
        wide = _wide(layers, "eps_frac")
        base = wide.loc[wide.index.isin(base_steps)]
        scan = wide.loc[wide.index.isin(before)]
        for name in wide.columns:
            center, sigma = robust_center_scale(base[name].to_numpy(dtype=float))
            if not math.isfinite(center):
                continue
            sigma = max(sigma, 0.005)
            rise = scan[name] - center
            hit = rise[(rise >= _EPS_FRAC_RISE) & ((scan[name] - center) / sigma >= config.z_threshold)]
            if not hit.empty:
                step = int(hit.index[0])
                value = float(scan[name].max())
                found.append({
                    "name": name, "kind": "eps_frac_rise", "before": center, "value": value, "step": step,
                    "lead_steps": max(0, reference - step),
                    "sentence": f"eps-dominated fraction of {name} rose from {fmt(center, 2)} to {fmt(value, 2)} "
                    f"from step {step}",
                })
    if "exp_avg_sq_mean" in layers.columns:
        wide = _wide(layers, "exp_avg_sq_mean")
        base = wide.loc[wide.index.isin(base_steps)]
        scan = wide.loc[wide.index.isin(scan_steps[scan_steps <= onset])]
        for name in wide.columns:
            center = float(np.nanmedian(base[name].to_numpy(dtype=float))) if base[name].notna().any() else math.nan
            if not center > 0:
                continue
            ratio = scan[name] / center
            hit = ratio[ratio <= _V_COLLAPSE]
            if not hit.empty:
                step = int(hit.index[0])
                low = float(scan[name].min())
                found.append({
                    "name": name, "kind": "exp_avg_sq_collapse", "before": center, "value": low, "step": step,
                    "lead_steps": max(0, reference - step),
                    "sentence": f"exp_avg_sq of {name} collapsed to {fmt(low / center, 2)}x its history "
                    f"({fmt(center)} -> {fmt(low)}) from step {step}",
                })
    for row in rows:
        if row["update_z"] >= config.z_threshold and not row["grad_z"] >= config.z_threshold / 2:
            found.append({
                "name": row["name"], "kind": "update_without_grad", "before": None, "value": row["update_z"],
                "step": row["departed_step"], "lead_steps": row["lead_steps"],
                "sentence": f"update/weight ratio of {row['name']} is {fmt(row['update_z'], 2)} sigma off its history "
                f"while its gradient norm is not (z {fmt(row['grad_z'], 2)}): the optimizer state, not the gradient, "
                "made the step large",
            })
    found.sort(key=lambda p: p["step"] if p["step"] is not None else onset)
    return found


def _nanmax(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.max()) if values.size else math.nan


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if np.ndim(value) == 0 else False
    except (TypeError, ValueError):
        return False
