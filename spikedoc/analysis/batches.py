"""Batch attribution: the onset batches' fingerprints and how they compare with the run's batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import as_float, fmt, robust_center_scale, robust_z
from spikedoc.analysis.config import AnalysisConfig

__all__ = ["high_entropy_stretch", "BatchProfile", "batch_profile", "hash_history", "attribute_batches", "positions_restarted",
           "date_positions", "repeated_in_a_row"]

# Batch statistics compared with the run's distribution: column -> (what it is, direction checked).
_BATCH_STATS = {
    "seq_len_median": ("median sequence length", "both"),
    "seq_len_max": ("longest sequence", "high"),
    "distinct_token_ratio": ("distinct-token ratio", "both"),
    "tokens": ("tokens in the step", "both"),
}
# Rows sampled for the distribution of per-batch worst-sample ratios.
_PROFILE_ROWS = 20_000


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
            sentence, flag = _stat_anomaly(column, what, direction, as_float(row[column]), profile.stats[column], config)
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
    offset, samples = as_float(row.get("sample_offset")), as_float(row.get("samples"))
    if math.isfinite(offset) and math.isfinite(samples):
        positions = [int(offset), int(offset + samples)]
    stats = {c: as_float(row.get(c)) for c in _BATCH_STATS if c in row.index and math.isfinite(as_float(row.get(c)))}
    return {
        "step": int(row["step"]),
        "segment": int(row["segment"]) if "segment" in row.index and math.isfinite(as_float(row["segment"])) else 0,
        "rank": int(row["rank"]) if "rank" in row.index and math.isfinite(as_float(row["rank"])) else 0,
        "sample_ids": ids,
        "positions": positions,
        "positions_from": None,
        "batch_hash": None if _is_missing(row.get("batch_hash")) else str(row.get("batch_hash")),
        "input_shapes": None if _is_missing(row.get("input_shapes")) else str(row.get("input_shapes")),
        "stats": stats,
        "anomalies": [],
        "flags": [],
        "worst_samples": [],
        "outlier_sample_ids": [],
        "repeat_of_step": None,
    }


def positions_restarted(lineage: pd.DataFrame) -> dict[int, int]:
    """Segments of a lineage whose stream positions count from 0 again at their resume: segment -> the step
    it resumed at.

    A resumed job that did not pass `watch(start_sample=...)` counts `sample_offset` from 0, while the
    lineage before it had handed out samples: its positions are counted from the resume, not in the data
    stream, and a skip list must say so.

    Example:
        >>> frame = pd.DataFrame({"step": [0, 1, 2, 2, 3], "segment": [0, 0, 0, 1, 1],
        ...                       "sample_offset": [0, 8, 16, 0, 8]})
        >>> positions_restarted(frame.drop(index=2))
        {1: 2}
    """
    if not {"step", "segment", "sample_offset"} <= set(lineage.columns) or lineage.empty:
        return {}
    offsets = lineage["sample_offset"].to_numpy(dtype=float)
    segments = lineage["segment"].to_numpy()
    firsts = np.flatnonzero(np.r_[False, segments[1:] != segments[:-1]])  # each later segment's first row
    reached = np.fmax.accumulate(np.where(np.isfinite(offsets), offsets, -np.inf))
    return {int(segments[i]): int(lineage["step"].iloc[i]) for i in firsts if offsets[i] == 0 and reached[i - 1] > 0}


def date_positions(batches: list[dict[str, Any]], restarted: dict[int, int]) -> None:
    """Mark the batches whose positions count from a resume (`positions_restarted`): `positions_from`."""
    for batch in batches:
        if batch["positions"] and batch["segment"] in restarted:
            batch["positions_from"] = restarted[batch["segment"]]


def _stat_anomaly(column, what, direction, value, center_sigma, config) -> tuple[str | None, str | None]:
    center, sigma = center_sigma
    if not math.isfinite(value) or not math.isfinite(center) or center <= 0:
        return None, None
    z = robust_z(value, center, sigma)
    ratio = value / center
    z_off = config.distinct_z if column == "distinct_token_ratio" else config.z_threshold
    high = direction in ("high", "both") and z >= z_off and ratio >= config.batch_ratio
    low = direction in ("low", "both") and z <= -z_off and ratio <= 1 / config.batch_ratio
    if column == "distinct_token_ratio" and value <= config.near_constant_ratio and ratio < 1:
        return f"distinct-token ratio {fmt(value, 2)}: near-constant input (run's median {fmt(center, 2)})", "near_constant"
    if high and column == "distinct_token_ratio":
        # Far more distinct tokens than the run's batches ever hold: random, binary or garbled data.
        return (f"{what} {fmt(value, 2)} is {fmt(ratio, 2)}x the run's median ({fmt(center, 2)}): "
                "high-entropy input (random, binary or garbled data?)"), f"high_{column}"
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


def repeated_in_a_row(steps: pd.DataFrame, left_out: set[tuple[int, int]] = frozenset()) -> list[dict[str, Any]]:
    """Stretches of consecutive steps of one rank and segment that were fed the same batch.

    A loader hands out a new batch each step: the same content hash at step s and s + 1 is a loader
    stuck on one batch (or data echoing on purpose). `left_out`: (segment, step) pairs whose batch
    was handed out again by design (a guard's replays), never part of a stretch.

    Returns:
        Dicts with `rank`, `segment`, `first_step`, `last_step`, `steps` and `batch_hash`, in step order.

    Example:
        >>> rows = pd.DataFrame({"step": [0, 1, 2, 3, 4], "segment": 0, "batch_hash": ["a", "b", "b", "b", "c"]})
        >>> [(s["first_step"], s["last_step"], s["steps"]) for s in repeated_in_a_row(rows)]
        [(1, 3, 3)]
    """
    if "batch_hash" not in steps.columns or steps.empty:
        return []
    rows = steps.loc[steps["batch_hash"].notna()]
    rank = rows["rank"] if "rank" in rows.columns else pd.Series(0, index=rows.index)
    segment = rows["segment"] if "segment" in rows.columns else pd.Series(0, index=rows.index)
    out = []
    for (r, g), part in rows.assign(_rank=rank, _segment=segment).groupby(["_rank", "_segment"], sort=True):
        part = part.sort_values("step", kind="stable")
        step, batch = part["step"].to_numpy(dtype=np.int64), part["batch_hash"].to_numpy()
        same = (np.diff(step) == 1) & (batch[1:] == batch[:-1])  # row i + 1 repeats row i
        if left_out:
            kept = np.array([(int(g), int(s)) not in left_out for s in step], dtype=bool)
            same &= kept[1:] & kept[:-1]
        # Stretches of repeats, vectorised (a run may have millions of rows): edges of `same`.
        edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
        for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):  # rows start..stop
            out.append({"rank": int(r), "segment": int(g), "first_step": int(step[start]), "last_step": int(step[stop]),
                        "steps": int(stop - start + 1), "batch_hash": str(batch[start])})
    return sorted(out, key=lambda s: (s["first_step"], s["rank"]))


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


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    try:
        return bool(pd.isna(value)) if np.ndim(value) == 0 else False
    except (TypeError, ValueError):
        return False


#: Fewest consecutive steps whose distinct-token ratios are judged together (`high_entropy_stretch`).
MIN_STRETCH = 3


def high_entropy_stretch(batches: list[dict[str, Any]], profile: BatchProfile, config: AnalysisConfig) -> dict[str, Any] | None:
    """The batches of consecutive steps (one incident's, one rank) whose distinct-token ratios are
    together far above the run's, though none is on its own: noisy or partly garbled data over a stretch.

    Their z-scores against the run's ratio are combined as `sum(z) / sqrt(n)` (Stouffer's z: a
    standard normal for independent batches of the run's own kind) and held to the one-batch bar,
    `distinct_z`, with and without the stretch's highest ratio. One test per incident, not a scan.

    Returns:
        None, or `steps`, `z`, `mean` (the stretch's mean ratio) and `median` (the run's).

    Example:
        >>> profile = BatchProfile(stats={"distinct_token_ratio": (0.6, 0.05)})
        >>> batches = [{"step": s, "stats": {"distinct_token_ratio": 0.75}} for s in range(10, 14)]
        >>> round(high_entropy_stretch(batches, profile, AnalysisConfig())["z"], 1)
        6.0
    """
    stat = profile.stats.get("distinct_token_ratio")
    values = [b["stats"].get("distinct_token_ratio") for b in batches]
    if stat is None or not stat[1] > 0 or len(values) < MIN_STRETCH or any(v is None for v in values):
        return None
    center, sigma = stat
    zs = sorted((v - center) / sigma for v in values)
    z = sum(zs) / math.sqrt(len(zs))
    # No one batch carries it: the test holds without the highest ratio too (one garbled batch
    # inside an incident of several steps is that batch, not a stretch).
    if not (z >= config.distinct_z and sum(zs[:-1]) / math.sqrt(len(zs) - 1) >= config.distinct_z):
        return None
    return {"steps": [int(b["step"]) for b in batches], "z": float(z), "mean": float(np.mean(values)), "median": center}
