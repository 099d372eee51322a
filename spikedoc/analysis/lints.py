"""Configuration lints: setups known to make training less stable, read from meta.json and the step table.

Each lint says nothing when its input is absent (runs from other tools have no meta.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import group_optimizer, param_groups, parameter_modules, watch_config
from spikedoc.analysis._robust import as_float, count, finite, fmt, fmt_steps, was_clipped
from spikedoc.analysis._rundata import clip_in_use
from spikedoc.analysis.attribution import module_kind
from spikedoc.analysis.context import warmup

__all__ = ["Finding", "lint", "LINTS"]

#: Lint ids, in the order they run.
LINTS = (
    "adam_coupled_weight_decay",
    "decay_on_bias_and_norm",
    "beta2_high_for_pretraining",
    "no_warmup",
    "no_clipping",
    "clipping_always_active",
    "accumulation_not_averaged",
)

_ADAM_FAMILY = ("adam", "adamw", "nadam", "radam", "adamax")
# A run whose loss fell below this share of its initial value trains from scratch (pretraining).
_FROM_SCRATCH = 0.6
# Steps averaged for the initial loss, and share of the run averaged for the final loss.
_HEAD, _TAIL = 5, 0.1
# Shortest lineage a warmup/clipping judgement is made on.
_MIN_STEPS = 20
# Share of steps clipped above which clipping is no longer an outlier guard.
_ALWAYS_CLIPPED = 0.9
# Exponent of grad norm on the micro-batch count above which the loss was summed, not averaged:
# averaged -> the norm stays flat or shrinks (K^-0.5 .. K^0); summed -> it grows (K^0.5 .. K^1).
_SUMMED_SLOPE = 0.5


@dataclass(kw_only=True)
class Finding:
    """One configuration finding (or a run-level observation), with its numbers and the reason."""

    id: str
    severity: str
    """`warning` (likely to cause instability) or `info` (worth knowing)."""
    message: str
    why: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        from spikedoc.analysis.incident import _jsonable

        return _jsonable(asdict(self))


def lint(meta: dict[str, Any] | None, steps: pd.DataFrame | None = None) -> list[Finding]:
    """Run every configuration lint.

    Args:
        meta: the run's meta.json (may be empty); every key is optional.
        steps: the run's step table along its final lineage (may be None).

    Returns:
        Findings, in `LINTS` order.

    Example:
        >>> meta = {"optimizer": {"class": "Adam", "param_groups": [{"index": 0, "weight_decay": 0.1, "params": ["w"]}]}}
        >>> [f.id for f in lint(meta)]
        ['adam_coupled_weight_decay']
    """
    meta = meta or {}
    steps = steps if steps is not None else pd.DataFrame({"step": pd.Series(dtype="int64")})
    found: list[Finding] = []
    for check in (_adam_weight_decay, _decay_on_bias_norm, _beta2, _no_warmup, _no_clipping, _clip_always, _accumulation):
        finding = check(meta, steps)
        if finding is not None:
            found.append(finding)
    return found


def _adam_weight_decay(meta, steps) -> Finding | None:
    groups = param_groups(meta)
    decayed = [i for i, g in enumerate(groups)
               if group_optimizer(meta, g) == "Adam" and as_float(g.get("weight_decay")) > 0]  # fmt: skip
    if not decayed:
        return None
    wd = max(as_float(groups[i]["weight_decay"]) for i in decayed)
    return Finding(
        id="adam_coupled_weight_decay",
        severity="warning",
        message=f"torch.optim.Adam with weight_decay={fmt(wd)} in {count(len(decayed), 'param group')}: this is an L2 "
        "penalty added to the gradient, not decoupled weight decay; use torch.optim.AdamW",
        why="Adam adds weight_decay * w to the gradient, which is then divided by sqrt(v): parameters with large "
        "gradients get almost no decay and quiet ones a lot. AdamW shrinks every weight by lr * wd outside the "
        "adaptive step (Loshchilov & Hutter 2019), which is what published recipes mean by weight decay.",
        details={"weight_decay": wd, "groups": decayed},
    )


def _decay_on_bias_norm(meta, steps) -> Finding | None:
    types = parameter_modules(meta)
    hit = []
    for group in param_groups(meta):
        if not as_float(group.get("weight_decay")) > 0:
            continue
        for name in group.get("params") or []:
            name = str(name)
            if name.endswith("bias") or module_kind(name, types.get(name)) == "norms":
                hit.append((name, as_float(group["weight_decay"])))
    if not hit:
        return None
    names = [n for n, _ in hit]
    return Finding(
        id="decay_on_bias_and_norm",
        severity="info",
        message=f"weight decay {fmt(max(w for _, w in hit))} applies to {count(len(hit), 'bias/norm tensor')}: {fmt_steps(names, 4)}",
        why="Biases and normalization gains set offsets and scales rather than features; decaying them toward 0 "
        "fights the normalization, and standard recipes leave them out (nanoGPT decays only 2-D weights): put them "
        "in a param group with weight_decay=0.",
        details={"tensors": names},
    )


def _beta2(meta, steps) -> Finding | None:
    betas = [g.get("betas") for g in param_groups(meta) if group_optimizer(meta, g).lower() in _ADAM_FAMILY
             and isinstance(g.get("betas"), (list, tuple)) and len(g["betas"]) == 2]  # fmt: skip
    high = [b for b in betas if as_float(b[1]) >= 0.999]
    if not high:
        return None
    scratch = _from_scratch(steps)
    if scratch is None:
        return None
    initial, final = scratch
    return Finding(
        id="beta2_high_for_pretraining",
        severity="info",
        message=f"beta2 = {fmt(as_float(high[0][1]), 4)} in a run trained from scratch (loss {fmt(initial)} -> {fmt(final)}): "
        "pretraining recipes use 0.95",
        why="beta2 = 0.999 averages the squared gradient over ~1000 steps, so the denominator lags when the gradient "
        "scale shifts; a sudden large gradient then makes an outsized step. LLaMA-style pretraining uses "
        "beta1 = 0.9, beta2 = 0.95 (a ~20-step average).",
        details={"beta2": as_float(high[0][1]), "initial_loss": initial, "final_loss": final},
    )


def _no_warmup(meta, steps) -> Finding | None:
    if len(steps) < _MIN_STEPS:
        return None
    w = warmup(steps)
    if w is None or w["visible"]:
        return None
    return Finding(
        id="no_warmup",
        severity="warning",
        message=f"no warmup: the LR at step {w['first_step']} was already {fmt(w['first_lr'])} "
        f"({fmt(w['first_lr'] / w['peak_lr'], 2)}x its peak {fmt(w['peak_lr'])})",
        why="Adam's bias-corrected moments rest on a handful of samples in the first steps, so full-size steps "
        "against a bad denominator are how runs diverge early; a linear warmup over the first 1-5% of steps "
        "(hundreds to thousands) is standard, and skipping it commonly produces a spike at step ~50-200.",
        details=w,
    )


def _no_clipping(meta, steps) -> Finding | None:
    config = watch_config(meta)
    if config is None or "grad_norm" not in steps.columns or len(steps) < _MIN_STEPS:
        return None
    if clip_in_use(meta, steps) is not None:  # watch(clip=), the loop's clip_grad_norm_, or clipped steps
        return None
    grad = finite(steps["grad_norm"])
    if grad.size == 0:
        return None
    return Finding(
        id="no_clipping",
        severity="warning",
        message=f"no gradient clipping: neither watch(clip=) nor a clip_grad_norm_ in the loop clipped, and clip_coef "
        f"stayed 1.0; grad norm median {fmt(float(np.median(grad)))}, max {fmt(float(grad.max()))}",
        why="Global-norm clipping (usually at 1.0) is the standard guard against one pathological batch producing "
        "a step that undoes thousands of good ones (GPT-3 and LLaMA clip at 1.0).",
        details={"grad_norm_median": float(np.median(grad)), "grad_norm_max": float(grad.max())},
    )


def _clip_always(meta, steps) -> Finding | None:
    if "clip_coef" not in steps.columns or len(steps) < _MIN_STEPS:
        return None
    coef = finite(steps["clip_coef"].iloc[len(steps) // 10 :])  # after the first 10%: early steps clip often
    if coef.size < _MIN_STEPS:
        return None
    share = float(was_clipped(coef).mean())
    if share < _ALWAYS_CLIPPED:
        return None
    clip = clip_in_use(meta, steps)
    return Finding(
        id="clipping_always_active",
        severity="info",
        message=f"clipping was active on {share:.0%} of steps (median coefficient {fmt(float(np.median(coef)), 2)})"
        + (f": max norm {fmt(as_float(clip))} is below the typical gradient norm" if clip is not None else ""),
        why="Clipping is meant to catch outlier batches; when it acts on nearly every step it is a hidden LR cut "
        "and no longer singles out the bad steps (a clipped spike looks like any other step).",
        details={"share": share, "median_coef": float(np.median(coef))},
    )


def _accumulation(meta, steps) -> Finding | None:
    if not {"micro_batches", "grad_norm"} <= set(steps.columns):
        return None
    frame = steps[["micro_batches", "grad_norm"]].apply(pd.to_numeric, errors="coerce").dropna()
    frame = frame.loc[(frame["micro_batches"] >= 1) & (frame["grad_norm"] > 0) & np.isfinite(frame["grad_norm"])]
    counts = frame.groupby("micro_batches")["grad_norm"].agg(["median", "size"])
    counts = counts.loc[counts["size"] >= 5]
    if len(counts) < 2:
        return None
    k = np.log(counts.index.to_numpy(dtype=float))
    g = np.log(counts["median"].to_numpy(dtype=float))
    slope = float(np.polyfit(k, g, 1)[0])
    if slope < _SUMMED_SLOPE:
        return None
    parts = ", ".join(f"{fmt(m)} at K={int(kk)}" for kk, m in zip(counts.index, counts["median"]))
    return Finding(
        id="accumulation_not_averaged",
        severity="warning",
        message=f"grad norm grows as K^{slope:.2f} with the micro-batch count K (median {parts}): the loss is summed, "
        "not divided by the number of micro-batches",
        why="With the loss divided by K, the accumulated gradient is the mean over micro-batches and its norm stays "
        "flat (or shrinks as noise averages out); without the division it is K times larger, which acts as a K "
        "times larger LR and makes clipping thresholds meaningless.",
        details={"slope": slope, "medians": {int(kk): float(m) for kk, m in zip(counts.index, counts["median"])}},
    )


def _from_scratch(steps: pd.DataFrame) -> tuple[float, float] | None:
    if "loss" not in steps.columns or len(steps) < _MIN_STEPS or int(steps["step"].iloc[0]) > 10:
        return None
    loss = steps["loss"].to_numpy(dtype=float)
    head = finite(loss[:_HEAD])
    tail = finite(loss[-max(_HEAD, int(len(loss) * _TAIL)) :])
    if head.size == 0 or tail.size == 0:
        return None
    initial, final = float(np.median(head)), float(np.median(tail))
    return (initial, final) if initial > 0 and final < _FROM_SCRATCH * initial else None
