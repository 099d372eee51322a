"""What an incident's onset shows: a build-up before it, its first non-finite value, the weights or the loss going back to the start."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import fmt, fmt_steps, steps_text
from spikedoc.analysis._rundata import PieceData
from spikedoc.analysis.attribution import LayerAttribution
from spikedoc.analysis.evidence import Evidence
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.incident import Incident

__all__ = ["reset_level", "param_reset", "one_step", "grad_precursor", "build_up", "first_nonfinite"]

# Steps from onset whose median loss (or parameter norm) is compared with the start of the run (a reset lasts; a batch does not).
_RESET_STEPS = 5


def reset_level(inc: Incident, frame: pd.DataFrame, shared: PieceData, ev: Evidence, cfg: AnalysisConfig) -> dict[str, Any] | None:
    """The loss back most of the way to its untrained level for several steps: the weights were reset.

    A single bad batch can reach the untrained level (random tokens are as hard for a trained model
    as for a fresh one) but only for its own step, so a one-step incident never counts.
    """
    loss = inc.series.get("loss")
    initial = shared.initial_loss
    if loss is None or initial is None or ev.one_step or "loss" not in frame.columns:
        return None
    after = frame.loc[frame["step"] >= inc.onset_step, "loss"].to_numpy(np.float64)[:_RESET_STEPS]
    after = after[np.isfinite(after)]
    base = loss["baseline"]
    if after.size < _RESET_STEPS or not initial > base:
        return None
    level = float(np.median(after))
    share = (level - base) / (initial - base)
    # Near the untrained level, not past it: a loss far above where training started is an explosion.
    if not cfg.state_reset_fraction <= share <= 2 - cfg.state_reset_fraction:
        return None
    return {"initial": initial, "level": level, "baseline": base, "share": share, "steps": _RESET_STEPS}


def one_step(inc: Incident, frame: pd.DataFrame) -> bool:
    """The first flagged series was out for one step and in the band at the very next logged step."""
    first = inc.series.get(inc.metric)
    if not first or first["onset_step"] != first["end_step"] or not first["recovered"]:
        return False
    later = frame.loc[frame["step"] > first["end_step"], "step"]
    return not later.empty and first["recovery_step"] == int(later.iloc[0])


def grad_precursor(inc: Incident, loss_flag: int | None, found: list[Incident], cfg: AnalysisConfig) -> dict[str, Any] | None:
    """The gradient norm flagged before the loss: in the incident, or a grad-norm incident still open when the loss moved."""
    if loss_flag is None:
        return None
    grad = inc.series.get("grad_norm")
    if grad and grad["onset_step"] < loss_flag:
        lead = loss_flag - grad["onset_step"]
        return {"step": grad["onset_step"], "lead_steps": lead,
                "sentence": f"the gradient norm was flagged at step {grad['onset_step']} ({fmt(grad['peak_value'])}, "
                f"{fmt(grad['magnitude_sigma'], 2)} sigma above its baseline {fmt(grad['baseline'])}), {steps_text(lead)} before the loss"}
    # A separate grad-norm spike earlier counts only while it lasts: one whose gradient norm came back
    # into its band before the loss moved was a passing outlier, not the start of this incident. Its
    # own band decides, not the loss's verdict on its aftermath (early in a run the loss is still far
    # off any trajectory, so a spike at step 1 is never `recovered` by the loss).
    earlier = [i for i in found if i.kind == "grad_spike" and loss_flag - cfg.lookback <= i.onset_step < inc.onset_step
               and ((back := _band_back(i)) is None or back >= loss_flag)]
    if earlier:
        first = earlier[0]
        lead = loss_flag - first.onset_step
        return {"step": first.onset_step, "lead_steps": lead,
                "sentence": f"a gradient-norm spike at step {first.onset_step} ({fmt(first.peak_value)}, "
                f"{fmt(first.magnitude_sigma, 2)} sigma) came {steps_text(lead)} before the loss was flagged"}
    return None


def _band_back(inc: Incident) -> int | None:
    """First step the gradient norm of a grad-norm incident was back in its band (None: never)."""
    grad = inc.series.get("grad_norm") or {}
    return grad.get("recovery_step") if grad.get("recovered") else None


def param_reset(inc: Incident, frame: pd.DataFrame, cfg: AnalysisConfig) -> dict[str, Any] | None:
    """The global parameter norm back most of the way to its value at the start of the run: the weights went back.

    Zeroed or rescaled optimizer moments can throw the loss back as far as a reset does, but they
    move the weights away from where training took them, never back to the initialisation.
    """
    if "param_norm" not in frame.columns or int(frame["step"].iloc[0]) > 10:
        return None
    norms = frame["param_norm"].to_numpy(np.float64)
    steps = frame["step"].to_numpy()
    ok = np.isfinite(norms)
    before, after = ok & (steps < inc.onset_step - 1), ok & (steps >= inc.onset_step - 1)
    if not before.any() or after.sum() < _RESET_STEPS:
        return None
    initial, last = float(norms[ok][0]), float(norms[before][-1])
    now = float(np.median(norms[after][:_RESET_STEPS]))
    if not abs(last - initial) > 0.01 * abs(last):
        return None  # the norm never moved far from its start: going "back" says nothing
    share = (last - now) / (last - initial)
    if not cfg.state_reset_fraction <= share <= 2 - cfg.state_reset_fraction:
        return None
    return {"initial": initial, "before": last, "after": now, "share": share}


def build_up(inc: Incident, ev: Evidence, reference: int, cfg: AnalysisConfig) -> dict[str, Any] | None:
    """Finite departures at least `build_up_steps` before `reference` (the first non-finite value, else the loss flag).

    The loss of step t is measured before step t's update, so it first shows the update of step
    t-1, whose gradient norm was logged a step earlier: a one-step lead of the gradient over the
    loss is the order of measurement, and a gradient that is itself the first non-finite value
    built nothing up.
    """
    limit = reference - cfg.build_up_steps
    sentences, steps = [], []
    g = ev.grad_precursor
    if g is not None and g["step"] <= limit:
        sentences.append(g["sentence"])
        steps.append(g["step"])
    layers = ev.layers
    if layers is not None:
        broke_at = layers.nonfinite_params[0] if layers.nonfinite_params is not None else None
        for row in layers.layers:
            d = row["departed_step"]
            # A parameter going non-finite in one update shows in its own norm a step early: not a build-up.
            recent = d is not None and reference - cfg.build_up_window <= d <= limit
            # Its gradient must have grown while finite: the non-finite gradient of the step that broke
            # (z inf) is the break itself, and says nothing of a growth before it.
            if recent and (broke_at is None or d < broke_at - 1) and row["grad_z_finite"] >= cfg.z_threshold:
                sentences.append(f"{row['name']} ({row['module']}) departed from its history at step {d}, "
                                 f"{steps_text(reference - d)} before step {reference}; its gradient norm reached "
                                 f"{fmt(row['grad_z_finite'], 2)} sigma off its history in the incident")
                steps.append(d)
                break
    if not sentences:
        return None
    c = ev.clipping
    if c and c["saturated"]:  # supports a build-up seen in the norms; alone, it is also a loop's steady regime
        sentences.append(f"clipping was active on {c['share']:.0%} of the {c['steps']} steps before onset (median "
                         f"coefficient {fmt(c['median_coef'], 2)}; {c['run_share']:.0%} earlier in the run)")
    return {"step": int(min(steps)), "lead_steps": int(reference - min(steps)), "sentences": sentences}


def first_nonfinite(inc: Incident, frame: pd.DataFrame, layers: LayerAttribution | None) -> dict[str, Any] | None:
    """The first non-finite loss or gradient norm of a non-finite incident, and the tensors it came from."""
    if inc.kind != "nonfinite":
        return None
    rows = frame.loc[frame["step"] >= inc.onset_step]
    steps = rows["step"].to_numpy()
    bad = np.zeros(len(rows), dtype=bool)
    for column in ("loss", "grad_norm"):
        if column in rows.columns:
            bad |= ~np.isfinite(rows[column].to_numpy(np.float64))
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    step, row = int(steps[i]), rows.iloc[i]
    loss_finite = "loss" in rows.columns and np.isfinite(float(row["loss"]))
    what = "the loss" if not loss_finite else "the gradient norm"
    grads = layers.nonfinite_grads if layers is not None else None
    if loss_finite and grads is not None and grads[0] == step:
        names, total = grads[1], grads[2]
        what = (f"the gradient of {fmt_steps(names, 3)} ({len(names)} of {total} tensors)" if len(names) < total
                else f"every tensor's gradient ({total} tensors)")
    return {"step": step, "what": what, "loss_finite": bool(loss_finite)}
