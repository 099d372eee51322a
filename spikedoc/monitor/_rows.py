"""Host side of a step: turn the landed statistics into a step-table row and a layer block."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from spikedoc.monitor._plan import Plan
from spikedoc.monitor._step import DeferredKey, StepRecord
from spikedoc.store.schema import lr_column

__all__ = ["step_row", "layer_block"]

_FINGERPRINT_COLUMNS = ("batch_hash", "seq_len_min", "seq_len_median", "seq_len_max", "distinct_token_ratio")


def _resolve(value: Any, values: dict[str, np.ndarray]) -> Any:
    """A record() value: host values as given, tensors from their landed copy."""
    if isinstance(value, DeferredKey):
        arr = values[value].astype(np.int64) if value.integer else values[value]
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return value


def _per_tensor(plan: Plan, values: dict[str, np.ndarray], key: str) -> np.ndarray | None:
    """Per-bucket vectors of `key` put back into optimizer order; None if no bucket has them.

    The result may be a view of `values` (one bucket in optimizer order): callers must not write to it.
    """
    buckets = plan.buckets
    if len(buckets) == 1 and buckets[0].in_order:
        return values.get(f"0:{key}")
    out = np.full(len(plan.params), np.nan)
    found = False
    for b, bucket in enumerate(plan.buckets):
        v = values.get(f"{b}:{key}")
        if v is not None:
            out[bucket.index] = v
            found = True
    return out if found else None


def _skipped(st: StepRecord, values: dict[str, np.ndarray]) -> bool:
    # A fused optimizer given the GradScaler's found_inf skips the update inside step() itself.
    return st.skipped or float(values.get("found_inf", 0.0)) > 0


def _total(vec: np.ndarray | None) -> float:
    if vec is None:
        return math.nan
    vec = np.asarray(vec, dtype=np.float64)
    return math.sqrt(float(vec @ vec))  # NaN and inf propagate


def _loss_value(value: Any) -> float:
    """A recorded loss as one number: a tensor of several elements (one per replica, say) by their mean."""
    if isinstance(value, list):
        arr = np.asarray(value, dtype=np.float64)
        return float(arr.mean()) if arr.size else math.nan
    return float(value)


def _flat(chunks: list[Any]) -> list[Any]:
    out: list[Any] = []
    for c in chunks:
        out += list(c) if isinstance(c, (list, tuple)) else [c]
    return out


def _clip_coef(values: dict[str, np.ndarray]) -> float:
    """The factor the gradients were scaled by: the loop's own clip, then `clip=`."""
    coef = float(values["clip_coef"]) if "clip_coef" in values else 1.0
    return coef * float(values["loop_clip_coef"]) if "loop_clip_coef" in values else coef


def _clip_max_norm(clip: float | None, st: StepRecord) -> float | None:
    """The max norm the step was clipped to (the smallest of several); None without clipping."""
    limits = [max_norm for _, max_norm in st.loop_clips]
    if clip is not None:
        limits.append(float(clip))
    return min(limits) if limits else None


def step_row(plan: Plan, clip: float | None, st: StepRecord, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """The step-table row of `st` (documented columns in spikedoc/store/schema.py); `clip` is `watch(clip=)`."""
    rec = st.recorded
    skipped = _skipped(st, values)
    losses = [_loss_value(_resolve(v, values)) for v in rec.get("losses", [])]
    if losses:
        loss = sum(losses) / len(losses)
    elif "loss_sum" in values and st.loss_count:
        loss = float(values["loss_sum"]) / (1 if st.loss_shares else st.loss_count)
    else:
        loss = math.nan
    grad = _per_tensor(plan, values, "grad_norm")
    update = _per_tensor(plan, values, "update_norm")
    nonfinite = _per_tensor(plan, values, "nonfinite")
    row: dict[str, Any] = {
        "step": st.index,
        "time": st.time,
        "step_time": st.step_time,
        "loss": loss,
        "micro_batches": st.forwards or len(losses),
    }
    for g, lr in enumerate(st.lrs):
        row[lr_column(g)] = float(_resolve(lr, values))
    row.update(
        grad_norm=_total(grad),
        clip_coef=_clip_coef(values),
        clip_max_norm=_clip_max_norm(clip, st),
        param_norm=_total(_per_tensor(plan, values, "param_norm")),
        update_norm=0.0 if skipped else _total(update) if st.full else math.nan,
        full_stats=st.full,
        nonfinite_grads=int(np.sum(nonfinite[~np.isnan(nonfinite)])) if nonfinite is not None else 0,
        loss_scale=float(values["loss_scale"]) if "loss_scale" in values else None,
        skipped=skipped,
        samples=st.fingerprint.samples,
        tokens=st.fingerprint.tokens,
        sample_offset=st.sample_offset,
        sample_ids=_flat([_resolve(v, values) for v in rec["sample_ids"]]) if "sample_ids" in rec else None,
        sample_losses=[float(x) for x in _flat([_resolve(v, values) for v in rec["sample_losses"]])]
        if "sample_losses" in rec
        else None,
        input_shapes=st.fingerprint.shapes,
    )
    row.update(dict.fromkeys(_FINGERPRINT_COLUMNS))  # same columns in every part, null when unknown
    row.update(st.fingerprint.host_values({k[3:]: v for k, v in values.items() if k.startswith("fp:")}))
    row.update(st.optimizer_values)
    for key, value in rec.get("extra", {}).items():
        row[key] = _resolve(value, values)
    return row


def layer_block(plan: Plan, st: StepRecord, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """The layer-table rows of `st`: one per parameter tensor, in optimizer order."""
    n = len(plan.params)
    nan = np.full(n, np.nan, dtype=np.float32)  # every null column of the block (the writer copies each)
    update = _per_tensor(plan, values, "update_norm")
    if _skipped(st, values):
        update = np.zeros(n)
    elif update is None:
        update = np.zeros(n) if st.full else nan  # a full step without an update is a no-op
    before = _per_tensor(plan, values, "param_norm_before")
    block: dict[str, Any] = {"step": np.full(n, st.index, dtype=np.int64), "name": list(plan.names)}
    for key in ("grad_norm", "grad_max", "param_norm"):
        vec = _per_tensor(plan, values, key)
        block[key] = vec.astype(np.float32) if vec is not None else nan
    block["update_norm"] = update.astype(np.float32)
    if before is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            block["update_ratio"] = (update / before).astype(np.float32)
    else:
        block["update_ratio"] = nan
    nonfinite = _per_tensor(plan, values, "nonfinite")  # none packed: every gradient element finite
    block["nonfinite"] = np.nan_to_num(nonfinite).astype(np.int64) if nonfinite is not None else np.zeros(n, np.int64)
    if not st.full:  # the optimizer-state columns exist, null: this step has only the cheap statistics
        block.update(dict.fromkeys(plan.stats.columns, nan))
        return block
    extra_keys = {k.split(":", 1)[1] for k in values if ":" in k and k.split(":", 1)[0].isdigit()}
    optim = {k: v for k in extra_keys if (v := _per_tensor(plan, values, k)) is not None}
    for key, vec in plan.stats.to_columns(optim, plan.numels).items():
        block[key] = np.asarray(vec, dtype=np.float32)
    return block
