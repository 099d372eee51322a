"""Optimizer state written from outside the optimizer anywhere in a run, incident or not.

An incident's precursors (`state_precursors`) hold its window's optimizer state to two exact bounds:
a first moment cannot grow by more than the gradients added since its last measurement, and a
second moment cannot fall faster than its decay. A write that breaks either without a loss
incident (a checkpoint converter that rescaled the moments, a state loaded from another run, a
bug in a custom step) still changes what every later update does, and the held-out loss can pay
for it long after. This module holds the whole run's layer table to the same bounds, read in
chunks of steps so that a long run's table is never in memory whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import fmt, steps_text
from spikedoc.analysis.state_precursors import MOMENTUM_COLUMNS, ROUNDING, falls_beyond_updates, momentum_beyond, wide_table

__all__ = ["STATE_BOUND_COLUMNS", "describe", "state_writes", "written_steps"]

#: The layer columns the bounds read.
STATE_BOUND_COLUMNS = ("grad_norm", "param_norm", "exp_avg_norm", "momentum_norm", "exp_avg_sq_mean")

#: Steps read at once; a chunk also rereads `_OVERLAP` steps before it, so that a measurement's
#: predecessor (a cost budget measures the state every few steps) is in the same chunk.
_CHUNK = 20_000
_OVERLAP = 1_000
#: Writes kept per chunk and moment (a run whose state is rewritten everywhere needs no more to be told).
_MOST_PER_CHUNK = 1_000


def state_writes(read_layers: Callable[[int, int], pd.DataFrame], first_step: int, last_step: int,
                 gradient_decay: dict[str, float], v_decay: dict[str, float]) -> list[dict[str, Any]]:  # fmt: skip
    """Every (step, tensor, moment) whose measured value breaks its optimizer's bound, earliest first.

    Args:
        read_layers: `(first, last) -> layer rows` with first <= step <= last (one rank's).
        first_step, last_step: the steps to scan.
        gradient_decay: parameter name -> the weight decay coupled into its gradient
            (`_meta.gradient_weight_decay`); first moments of other tensors are not judged.
        v_decay: parameter name -> the least factor one update can shrink its second moment by
            (`_meta.second_moment_decay`); second moments of other tensors are not judged.

    Returns:
        Dicts with `step` (the measurement that broke the bound), `since` (the measurement before
        it: the write happened in between), `name`, `moment` (`exp_avg`, `momentum`, `exp_avg_sq`),
        `before`, `value`, `bound` (the most, or least, the updates allow).
    """
    found: list[dict[str, Any]] = []
    for start in range(first_step, last_step + 1, _CHUNK):
        stop = min(last_step, start + _CHUNK - 1)
        layers = read_layers(max(first_step, start - _OVERLAP), stop)
        if layers.empty:
            continue
        # Within one segment only: a resume or a rollback loads its state (the lineage's business).
        segments = layers.groupby("segment", sort=False) if "segment" in layers.columns else [(0, layers)]
        for _, rows in segments:
            found += [w for w in _chunk_writes(rows, gradient_decay, v_decay) if start <= w["step"] <= stop]
    return sorted(found, key=lambda w: (w["step"], w["name"]))


def written_steps(writes: list[dict[str, Any]]) -> list[int]:
    """The first step each write can have happened at (the step after the measurement before it)."""
    return sorted({w["since"] + 1 for w in writes})


def _chunk_writes(layers: pd.DataFrame, gradient_decay: dict[str, float], v_decay: dict[str, float]) -> list[dict[str, Any]]:
    out = []
    if gradient_decay and "grad_norm" in layers.columns:
        for metric, moment in MOMENTUM_COLUMNS.items():
            if metric in layers.columns:
                wide = _measured(layers, metric)
                ratio, bound = momentum_beyond(layers, wide, gradient_decay)
                out += _broken(wide, ratio > 1 + ROUNDING, bound, moment)
    if "exp_avg_sq_mean" in layers.columns and v_decay:
        wide = _measured(layers, "exp_avg_sq_mean")
        beyond, least = falls_beyond_updates(wide, v_decay)
        out += _broken(wide, beyond, least, "exp_avg_sq")
    return out


def _measured(layers: pd.DataFrame, metric: str) -> pd.DataFrame:
    wide = wide_table(layers, metric)
    return wide.loc[wide.notna().any(axis=1)]


def _broken(wide: pd.DataFrame, hits: pd.DataFrame, bound: pd.DataFrame, moment: str) -> list[dict[str, Any]]:
    """The cells of `hits` as writes, each with the measurement before it (at most `_MOST_PER_CHUNK`)."""
    hit = hits.reindex(index=wide.index, columns=wide.columns).fillna(False).to_numpy(dtype=bool)
    if not hit.any():
        return []
    index = wide.index.to_numpy()
    measured_at = np.where(wide.notna().to_numpy(), index[:, None], np.nan)
    before = wide.ffill().shift(1).to_numpy(dtype=float)
    since = pd.DataFrame(measured_at).ffill().shift(1).to_numpy()
    rows, cols = np.nonzero(hit & np.isfinite(since))
    values, most = wide.to_numpy(dtype=float), bound.reindex(index=wide.index, columns=wide.columns).to_numpy(dtype=float)
    names = wide.columns.astype(str)
    return [{"step": int(index[i]), "since": int(since[i, j]), "name": names[j], "moment": moment,
             "before": float(before[i, j]), "value": float(values[i, j]), "bound": float(most[i, j])}
            for i, j in zip(rows[:_MOST_PER_CHUNK], cols[:_MOST_PER_CHUNK])]  # fmt: skip


def describe(writes: list[dict[str, Any]], *, shown: int = 3) -> str:
    """The finding's sentence: the writes grouped by measurement and moment, the first `shown`
    groups each with its count and its largest departure."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for w in writes:
        groups.setdefault((w["since"], w["step"], w["moment"]), []).append(w)
    parts = [_group_sentence(since, step, moment, members) for (since, step, moment), members in list(groups.items())[:shown]]
    more = len(groups) - len(parts)
    return "; ".join(parts) + (f"; and {more} more such change{'s' if more > 1 else ''}" if more > 0 else "")


def _group_sentence(since: int, step: int, moment: str, members: list[dict[str, Any]]) -> str:
    when = f"at step {step}" if since == step - 1 else f"between steps {since} and {step}"
    tensors = f"{len(members)} tensors" if len(members) > 1 else members[0]["name"]
    if moment == "exp_avg_sq":
        w = min(members, key=lambda m: m["value"] / m["bound"])
        return (f"{moment} of {tensors} fell {when} below what its decay allows (most: {w['name']} "
                f"{fmt(w['before'])} -> {fmt(w['value'])}, {fmt(w['value'] / w['before'], 2)}x in {steps_text(step - since)})")
    w = max(members, key=lambda m: m["value"] / m["bound"])
    return (f"{moment} of {tensors} grew {when} beyond what its gradients could add (most: {w['name']} "
            f"{fmt(w['before'])} -> {fmt(w['value'])}, {fmt(w['value'] / w['bound'], 2)}x that most)")
