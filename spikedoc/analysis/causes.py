"""Cause rules (the playbook's checklist, in order, as one table) and the severity of an incident.

What to do about a cause is `spikedoc.analysis.advice`; its public names are re-exported here.
"""

from __future__ import annotations

import math
from typing import Any

from spikedoc.analysis._robust import count, fmt, fmt_step_ranges, fmt_steps, steps_text, times
from spikedoc.analysis.advice import ACTIONS, clip_kept_because, recommend, tighter_clip, to_act_on
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.evidence import MIN_LOOKBACK as _MIN_LOOKBACK, Evidence
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.schedule import restart_path

__all__ = ["Evidence", "RULES", "to_act_on", "decide_cause", "cause_guessed", "severity", "recommend", "tighter_clip", "clip_kept_because", "ACTIONS"]

# A freshly built Adam state after one step is (1 - beta2) g^2: <= 0.05 of a trained one for beta2 >= 0.95.
_MOMENTS_RESET = 0.1
# Update/weight ratio above which the LR is too high for the weights (rule of thumb: ~1e-3 is healthy).
_HIGH_UPDATE_RATIO = 1e-2
# Batch anomalies measured on the model's output (a sample's loss far above its batch's) or singled
# out by it (a stretch the loss found, its batches only mildly off together, `stretches.py`), which a
# broken optimizer state can produce too; every other anomaly is a property of the input alone.
_STATE_DEPENDENT = {"outlier_samples", "noisy_stretch"}


def decide_cause(incident: Incident, ev: Evidence, config: AnalysisConfig | None = None) -> tuple[str, list[str]]:
    """Walk the checklist in order; the first rule whose evidence is present decides the cause.

    The order and what each cause requires are `RULES` (docs/analysis.md explains each).

    Returns:
        (cause, evidence sentences).

    Example:
        >>> from spikedoc.analysis.incident import Incident
        >>> inc = Incident(kind="loss_spike", metric="loss", onset_step=500, peak_step=500, end_step=500,
        ...                magnitude_sigma=30.0, peak_ratio=3.0, baseline=2.0, peak_value=6.0, recovered=True)
        >>> decide_cause(inc, Evidence(loss_flag_step=500, one_step=True))[0]
        'bad_batch'
    """
    config = config or AnalysisConfig()
    for cause, _requires, rule in RULES:
        found = rule(incident, ev, config)
        if found:
            return cause, found
    return "unknown", _unknown(incident, ev)


def _state_reset(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    if ev.resume is None:
        r, p = ev.reset_level, ev.param_reset
        if p is None or (ev.lr_jump is not None and ev.lr_jump["direction"] == "up"):
            return []  # the loss level alone does not show the weights went back (zeroed moments throw it back too)
        out = [
            f"the parameter norm went from {fmt(p['before'])} back to {fmt(p['after'])}, {p['share']:.0%} of the way to its "
            f"value {fmt(p['initial'])} at the start of the run: the weights were reset (re-initialised, or an early "
            "or wrong state loaded), not a spike"
        ]
        if r is not None:
            out.append(f"the loss went back to {fmt(r['level'])} (median of the {r['steps']} steps from onset), "
                       f"{r['share']:.0%} of the way from its baseline {fmt(r['baseline'])} to its untrained level {fmt(r['initial'])}")
        return out
    out = list(ev.resume.evidence) if ev.resume.state_reset else []
    if ev.moments_ratio is not None and ev.moments_ratio < _MOMENTS_RESET:
        out.append(
            f"Adam's exp_avg_sq fell to {fmt(ev.moments_ratio, 2)}x its value across the resume at step "
            f"{ev.resume.step} (median over tensors): the optimizer moments were not restored"
        )
    if out:
        out.append(f"the incident starts {steps_text(incident.onset_step - ev.resume.step)} after that resume")
    return out


def _lr_schedule(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    jump = ev.lr_jump
    if jump is None or jump["direction"] != "up":
        return []
    groups = jump.get("groups", [jump["group"]])
    group = "" if groups == [0] or len(groups) > 1 else f" (param group {groups[0]})"
    if jump.get("retraced"):
        out = [
            f"at the resume at step {jump['step']} the LR{group} went back to the values of the run's first "
            f"{jump['retraced']} steps: it {restart_path(jump)}, {steps_text(incident.onset_step - jump['step'])} "
            "before onset: the schedule started again from step 0"
        ]
    else:
        out = [
            f"the LR{group} jumped from {fmt(jump['before'])} to {fmt(jump['after'])} ({fmt(jump['factor'], 2)}x) at step "
            f"{jump['step']}, {steps_text(incident.onset_step - jump['step'])} before onset"
        ]
    r = ev.reset_level
    if r is not None and ev.resume is None:
        out.append(f"the loss went back to {fmt(r['level'])}, {r['share']:.0%} of the way from its baseline {fmt(r['baseline'])} "
                   f"to its untrained level {fmt(r['initial'])}: the jump undid much of the training so far")
    if jump.get("at_resume") is not None:
        out.append(
            f"step {jump['step']} is where segment {jump['at_resume']} resumed the run: the scheduler's state (its "
            "step count) was likely not restored with the checkpoint"
        )
    return out


def _numerics_rank(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    ranks = ev.ranks
    if not ranks or not ranks["alone"]:
        return []
    for batch in ev.batches:
        if batch["rank"] in ranks["off_ranks"] and batch["anomalies"]:
            return []  # that rank was fed a bad batch: data, not hardware
    out = list(ranks["sentences"])
    out.append(
        f"{len(ranks['off_ranks'])} of {len(ranks['ranks'])} ranks went off with the same parameters and a normal "
        "batch: numerics or hardware on that rank, not the model"
    )
    return out


def _bad_batch(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    out = []
    for batch in ev.batches:
        if batch["anomalies"]:
            where = f"step {batch['step']}" + (f", rank {batch['rank']}" if ev.ranks else "")
            out.extend(f"batch at {where}: {a}" for a in batch["anomalies"])
    if out and ev.stretch:
        steps = [b["step"] for b in ev.stretch]
        flags = sorted({f for b in ev.stretch for f in b["flags"]})
        out.append(f"{count(len(steps), 'more batch', 'more batches')} after onset "
                   f"(steps {fmt_step_ranges(steps)}) show the same anomaly ({', '.join(flags)}): a stretch of bad data")
    return out


def _bad_input(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    """An anomaly of the batch's input itself (lengths, tokens, a repeat): no model state produces one."""
    if not any(set(b["flags"]) - _STATE_DEPENDENT for b in ev.batches if b["anomalies"]):
        return []
    return _bad_batch(incident, ev, config)


def _bad_batch_shape(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    if not ev.one_step or ev.build_up is not None:
        return []  # a gradient norm rising ahead of the loss is a growing instability, not one batch
    outranked = _outranked(incident, ev)
    if incident.kind == "nonfinite" and not ev.scaler_skipped:
        return []  # a non-finite value the optimizer stepped on is numerics (a rule below), not the batch's shape
    if incident.metric == "loss" and incident.kind == "nonfinite":
        return [
            f"the loss was non-finite at step {incident.onset_step} only and finite again at the next step, and the loss "
            "scaler skipped that step's update: the batch itself overflowed in reduced precision"
        ]
    if incident.metric == "loss":
        return [
            f"the loss was out of the band at step {incident.onset_step} only ({times(incident.peak_ratio)} its "
            f"baseline) and back in the band at the next step: the loss is measured before the update, so the "
            "batch itself had an unusually high loss"
        ] + outranked
    if ev.loss_flag_step is None:
        return [
            f"the gradient norm was out of the band at step {incident.onset_step} only ({times(incident.peak_ratio)} "
            f"its baseline, {fmt(incident.magnitude_sigma, 2)} sigma), back at the next step"
            + (", and the loss did not react" if ev.has_loss else " (no loss recorded to compare)")
            + ": one batch with an outlier gradient, not a growing instability"
        ]
    return []


def _outranked(incident: Incident, ev: Evidence) -> list[str]:
    """Weaker evidence that a one-step spike outranks, said so that the choice can be checked."""
    if ev.layers is None:
        return []
    out = [f"outranked by the one-step shape: {p['sentence']}" for p in ev.layers.precursors[:2]]
    if ev.layers.earliest_step is not None and ev.layers.earliest_step < incident.onset_step and not out:
        out.append(f"outranked by the one-step shape: tensors departing from their history from step {ev.layers.earliest_step}")
    return out


def _no_warmup_start(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    """An incident in the very first steps of a run whose LR started at its peak: the recorded LR, not the shape."""
    w = ev.warmup
    if w is None or w["visible"] or incident.onset_step - w["first_step"] >= _MIN_LOOKBACK:
        return []
    return [f"no warmup: the LR started at {fmt(w['first_lr'])} ({fmt(w['first_lr'] / w['peak_lr'], 2)}x its peak) and the "
            f"incident starts at step {incident.onset_step}, within the first {_MIN_LOOKBACK} steps: Adam's moments (and "
            "any optimizer's step size) are not yet adapted there, and skipping warmup commonly produces a spike"]


def _minor_blip(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    if not ev.minor:
        return []
    return [f"a minor incident the run recovered from ({times(incident.peak_ratio)} its baseline at step "
            f"{incident.peak_step}), with no anomalous batch, LR jump or rank behind it: its shape alone names no "
            "cause, and nothing needs doing"]


def _sudden_nonfinite(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    first = ev.first_nonfinite
    if not ev.nonfinite_out_of_nowhere:
        return []
    layers = ev.layers
    before = f"the gradient norm was {fmt(ev.grad_before)} the step before; " if math.isfinite(ev.grad_before) else ""
    out = [
        f"the first non-finite value is {first['what']} at step {first['step']}, with no build-up: {before}nothing "
        f"was flagged in the {ev.lookback_steps} logged steps before; a non-finite value out of nowhere is numerics "
        "(an overflow on one batch, a corrupted value or device), not a growing explosion: a lower LR or tighter "
        "clipping does not prevent it"
    ]
    if layers is not None and layers.nonfinite_params is not None:
        out.append(f"the parameters of {fmt_steps(layers.nonfinite_params[1], 3)} became non-finite at step {layers.nonfinite_params[0]}")
    return out


def _optimizer_state(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    out = []
    for p in _state_at_onset(ev)[:3]:
        out.append(p["sentence"] + (f" ({steps_text(p['lead_steps'])} before the loss flag)" if p.get("lead_steps") else ""))
    if not out and ev.update_step and ev.update_step["fired"] and ev.first_nonfinite is None:
        out.append(
            f"the update norm per unit LR was {fmt(ev.update_step['update_z'], 2)} sigma above its history at step "
            f"{ev.update_step['step']} while the gradient norm was not (z {fmt(ev.update_step['grad_z'], 2)}, at most, up "
            "to that step): the optimizer's state made the step large"
        )
    # Early in a run the level test has no history yet; the step-to-step jump needs only 20 steps.
    broke = ev.first_nonfinite["step"] if ev.first_nonfinite is not None else None
    if not out and ev.state_jump is not None and (broke is None or ev.state_jump < broke):
        out.append(
            f"the update norm per unit LR jumped at step {ev.state_jump} from the step before, by far more than any step "
            "in its recent history, while the gradient norm did not: the optimizer's state (its moments or momentum) "
            "changed under the run and made the step large"
        )
    return out


def _lr_too_high(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    out = []
    w = ev.warmup
    if w is not None and w["visible"]:
        end = w["end_step"]
        if end is None or incident.onset_step <= 2 * end:
            where = "during the warmup" if end is None or incident.onset_step <= end else f"{steps_text(incident.onset_step - end)} after the warmup ended (step {end})"
            out.append(
                f"the incident starts at step {incident.onset_step}, {where}, with the LR at {fmt(ev.lr_onset)} "
                f"(peak {fmt(w['peak_lr'])}): early instability means the LR is too high for this model"
            )
    elif w is not None and not w["visible"] and incident.onset_step - w["first_step"] < config.early_steps:
        out.append(
            f"no warmup: the LR started at {fmt(w['first_lr'])} ({fmt(w['first_lr'] / w['peak_lr'], 2)}x its peak) and the "
            f"incident starts at step {incident.onset_step}; Adam's moments are unreliable for the first few hundred "
            "steps, and skipping warmup commonly produces a spike there"
        )
    layers = ev.layers
    if layers is not None and layers.median_update_ratio >= _HIGH_UPDATE_RATIO and (out or incident.kind == "nonfinite"):
        out.append(
            f"median update/weight ratio at onset {fmt(layers.median_update_ratio)}, above {_HIGH_UPDATE_RATIO:g} "
            "(healthy training moves weights by about 1e-3 of their norm per step)"
        )
    return out


def _grad_explosion(incident: Incident, ev: Evidence, config: AnalysisConfig) -> list[str]:
    if ev.build_up is None:
        if ev.minor or incident.metric != "grad_norm" or ev.loss_flag_step is not None or incident.kind == "nonfinite":
            return []
        grad = incident.series.get("grad_norm") or {}
        if grad.get("recovered"):
            return []  # outliers that each came back into the band (two one-step blips in one episode): no explosion
        if grad.get("end_step") == grad.get("onset_step"):
            return []  # one step out, then no finite value to tell: it never showed that it stayed up
        return [  # a gradient norm that stayed out of its band: not a blip, whatever the loss did
            f"the gradient norm reached {fmt(incident.peak_value)} at step {incident.peak_step}, "
            f"{fmt(incident.magnitude_sigma, 2)} sigma above its baseline {fmt(incident.baseline)}, and did not come back"
            + ("; the loss did not react" if ev.has_loss else " (no loss recorded)")
        ]
    out = list(ev.build_up["sentences"])
    if incident.kind == "nonfinite":
        out.append("a non-finite loss late in training follows exploding gradients (troubleshooting table)")
    return out


#: The checklist, in order: (cause, the evidence it requires in the recorded run, the rule that looks
#: for it). The first rule whose evidence is present decides; none: `unknown`, saying what would have
#: told. docs/analysis.md ("Cause rules") is this table in words.
RULES = (
    ("state_reset", "a resume that did not restore the state (loss back to its initial level, or fresh Adam "
                    "moments), or the parameter norm back most of the way to its start", _state_reset),
    ("lr_schedule", "an upward LR discontinuity within lookback steps before onset", _lr_schedule),
    ("numerics_rank", "one rank alone off, with a normal batch on that rank", _numerics_rank),
    ("bad_batch", "a batch at onset or the two steps before whose input is anomalous (lengths, tokens, a repeat)", _bad_input),
    ("optimizer_state", "optimizer state departing at the onset (moments collapsing, eps share rising, an update "
                        "without a gradient), before any non-finite value", _optimizer_state),
    ("bad_batch", "an anomalous batch at onset or the two steps before", _bad_batch),
    ("lr_too_high", "an incident in the first 10 steps of a run whose LR started at its peak (no warmup)", _no_warmup_start),
    ("unknown", "a minor incident with none of the evidence above: no cause is named", _minor_blip),
    ("bad_batch", "one step out of the band and back at the next, no build-up", _bad_batch_shape),
    ("numerics_rank", "a non-finite value with no build-up before it (10+ logged steps to judge)", _sudden_nonfinite),
    ("lr_too_high", "early instability (in or right after the warmup, or early without one)", _lr_too_high),
    ("grad_explosion", "a build-up: the gradient norm or a tensor off its history 2+ steps before, or clipping "
                       "saturation before onset", _grad_explosion),
)


def _state_at_onset(ev: Evidence) -> list[dict[str, Any]]:
    """Optimizer-state precursors seen at the onset (not an earlier drift) and before any non-finite
    value (a state built from non-finite gradients is a consequence, not a cause)."""
    if ev.layers is None:
        return []
    broke = ev.first_nonfinite["step"] if ev.first_nonfinite is not None else None
    return [p for p in ev.layers.precursors if p.get("at_onset") and (broke is None or (p["step"] is not None and p["step"] < broke))]


def _unknown(incident: Incident, ev: Evidence) -> list[str]:
    """Say what was checked and found clean, and what could not be checked for lack of data."""
    fingerprints = any(b["stats"] or b["batch_hash"] or b["sample_ids"] for b in ev.batches)
    layers = ev.layers is not None and ev.layers.history_steps > 0
    checks = [
        (fingerprints, "no anomalous batch statistic at onset", "batch statistics (no fingerprints)"),
        (math.isfinite(ev.lr_onset), "no LR discontinuity before it", "the LR (not logged)"),
        (ev.has_grad, "no gradient-norm flag ahead of the loss", "the gradient norm (not logged)"),
        (layers, "no tensor departing from its history ahead of the loss", "per-tensor history (no layer table)"),
    ]
    clean = [ok for has, ok, _ in checks if has]
    unchecked = [what for has, _, what in checks if not has]
    out = ["nothing in the checklist matched: " + ("; ".join(clean) if clean else "no evidence was available")]
    if unchecked:
        out.append("could not check " + ", ".join(unchecked))
    r = ev.reset_level
    if r is not None and ev.resume is None:
        out.append(f"the loss went back to {fmt(r['level'])}, {r['share']:.0%} of the way to its untrained level, but "
                   + ("the parameter norm did not go back: not a reset of the weights" if ev.has_param_norm else
                      "without the parameter norm (not logged) a reset of the weights cannot be told from a state "
                      "that threw the loss back (zeroed optimizer moments)"))
    return out + ev.notes



# Causes the loss's shape alone can suggest: labelled guessed when no other data in the run confirms them.
_GUESSABLE = ("bad_batch", "grad_explosion", "lr_too_high", "optimizer_state")


def severity(incident: Incident, config: AnalysisConfig | None = None) -> str:
    """`minor`, `moderate` or `severe` from the verdict, the kind and the size of the loss's peak.

    Example:
        >>> inc = Incident(kind="loss_spike", metric="loss", onset_step=9, peak_step=9, end_step=9, magnitude_sigma=8.5,
        ...                peak_ratio=1.1, baseline=2.0, peak_value=2.2, recovered=True, damage={"excess_ratio": 0.0},
        ...                series={"loss": {"peak_ratio": 1.1, "onset_step": 9, "end_step": 9}})
        >>> severity(inc)
        'minor'
    """
    config = config or AnalysisConfig()
    if incident.verdict != "recovered" or incident.cause == "state_reset":
        return "severe"
    if incident.kind == "nonfinite":
        return "moderate"
    if not incident.damage:
        return "moderate"  # no loss to judge the aftermath on: it cannot be called harmless
    loss = incident.series.get("loss")
    if loss is None:
        return "minor"  # the loss never left its band and is on its trajectory: nothing was harmed
    blip = loss["end_step"] - loss["onset_step"] < config.minor_steps
    return "minor" if blip and loss["peak_ratio"] - 1 < config.minor_ratio else "moderate"


def cause_guessed(incident: Incident, ev: Evidence) -> bool:
    """The cause rests on the loss's shape alone: no batch data, no tensors, no gradient norm, no LR."""
    if incident.cause not in _GUESSABLE:
        return False
    fingerprints = any(b["stats"] or b["batch_hash"] or b["sample_ids"] for b in ev.batches)
    tensors = ev.layers is not None and ev.layers.history_steps > 0
    if incident.cause == "bad_batch":
        return not fingerprints
    return not (tensors or ev.has_grad or math.isfinite(ev.lr_onset))

