"""Cause rules (the playbook's checklist, in order) and the recommendation that follows from a cause."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spikedoc.analysis._robust import count, fmt, fmt_step_ranges, fmt_steps, steps_text, times
from spikedoc.analysis.attribution import LayerAttribution
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.lineage import Resume

__all__ = ["Evidence", "RULES", "to_act_on", "decide_cause", "cause_guessed", "severity", "recommend", "tighter_clip", "clip_kept_because", "ACTIONS"]

# A freshly built Adam state after one step is (1 - beta2) g^2: <= 0.05 of a trained one for beta2 >= 0.95.
_MOMENTS_RESET = 0.1
# Update/weight ratio above which the LR is too high for the weights (rule of thumb: ~1e-3 is healthy).
_HIGH_UPDATE_RATIO = 1e-2
# Logged steps before onset needed to say that nothing built up there.
_MIN_LOOKBACK = 10
# Causes whose fix is to repair the run's state or setup rather than to train more conservatively.
_REPAIR = ("lr_schedule", "state_reset", "numerics_rank")


@dataclass(kw_only=True)
class Evidence:
    """Everything attribution and context found for one incident; the input of `decide_cause`."""

    loss_flag_step: int | None = None
    """First step the loss itself was flagged (None for a grad-norm-only incident)."""
    batches: list[dict[str, Any]] = field(default_factory=list)
    """Candidate onset batches (`attribute_batches`)."""
    stretch: list[dict[str, Any]] = field(default_factory=list)
    """Batches after onset, inside the incident and in an unbroken run just after it, with an anomaly
    of the kind an onset batch has: a corrupt stretch of data rather than one batch."""
    one_step: bool = False
    """The incident's first series was out of the band at its onset step only, back in it right after."""
    layers: LayerAttribution | None = None
    grad_precursor: dict[str, Any] | None = None
    """`step`, `lead_steps`, `sentence`: the grad norm flagged before the loss."""
    lr_jump: dict[str, Any] | None = None
    """Upward LR discontinuity in the lookback window (`lr_discontinuities` entry, plus `at_resume`)."""
    lr_onset: float = math.nan
    warmup: dict[str, Any] | None = None
    clipping: dict[str, Any] | None = None
    loss_scale: dict[str, Any] | None = None
    ranks: dict[str, Any] | None = None
    resume: Resume | None = None
    """The resume the incident follows closely, if any."""
    moments_ratio: float | None = None
    """exp_avg_sq after / before that resume (median over tensors)."""
    update_step: dict[str, Any] | None = None
    """`update_without_grad` on the step table."""
    grad_before: float = math.nan
    """Gradient norm at the last logged step before onset."""
    has_grad: bool = False
    """The step table has a finite gradient norm somewhere."""
    has_loss: bool = True
    """The step table has a finite loss somewhere (else nothing can be said about its reaction)."""
    lookback_steps: int = 0
    """Logged steps in the lookback window before onset (the data a "no build-up" claim rests on)."""
    notes: list[str] = field(default_factory=list)
    """What could not be checked (missing columns, short history)."""
    reset_level: dict[str, Any] | None = None
    """The loss back most of the way to its untrained level for several steps: `initial`, `level`,
    `baseline`, `share`, `steps`."""
    param_reset: dict[str, Any] | None = None
    """The parameter norm went back most of the way to its value at the start of the run: `initial`,
    `before`, `after`, `share`. None also when the parameter norm was not logged (`has_param_norm`)."""
    has_param_norm: bool = False
    scaler_skipped: bool = False
    """A loss scaler skipped the onset step's update (the `skipped` column)."""
    minor: bool = False
    """The incident is minor (recovered, a blip): a cause is named only on evidence beyond its shape."""
    build_up: dict[str, Any] | None = None
    """Finite departures at least `build_up_steps` ahead of the first non-finite value or the loss
    flag: `step`, `lead_steps`, `sentences`. A one-step lead of the gradient norm over the loss is the
    order they are measured in (the loss of step t shows the update of step t-1), not a build-up."""
    first_nonfinite: dict[str, Any] | None = None
    """The first non-finite value of a non-finite incident: `step`, `what` (a sentence naming the
    series or tensors), `loss_finite` (the loss of that step was finite: its batch's backward or
    the update broke, the state before the step is good)."""


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
            f"value {fmt(p['initial'])} at the start of the run: the weights were reset (a checkpoint or state_dict that "
            "was never loaded), not a spike"
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
    if first is None or ev.build_up is not None or ev.lookback_steps < _MIN_LOOKBACK:
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
            f"the update norm per unit LR was {fmt(ev.update_step['update_z'], 2)} sigma above its history while the "
            f"gradient norm was not (z {fmt(ev.update_step['grad_z'], 2)}): the optimizer's state made the step large"
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


def tighter_clip(current: float | None, *, clipped_share: float = 0.0) -> float | None:
    """The clipping norm to use next: 1.0 when unclipped or above 1.0, else half the current one.

    None (keep it) when the clip already acts on at least half of the steps (`clipped_share`, of
    the steps before the incident): it then scales the typical update down, so tightening it is an
    LR cut on every step (the LR advice's job) rather than a bound on outliers.

    Example:
        >>> tighter_clip(2.0), tighter_clip(1.0), tighter_clip(None), tighter_clip(1.0, clipped_share=0.9)
        (1.0, 0.5, 1.0, None)
    """
    if current is None or not math.isfinite(current) or current <= 0:
        return 1.0
    if clipped_share >= 0.5:
        return None
    return 1.0 if current > 1.0 else current / 2


def clip_kept_because(clip: float, clipped_share: float, steps: int) -> str:
    """Why `tighter_clip` kept the clip: a sentence for the advice and the guard's rollback."""
    return (f"clipping at {fmt(clip)} already acts on {clipped_share:.0%} of the {steps} steps before: tightening it "
            "would scale every update down, an LR cut, not a bound on outliers")


#: Kinds of action a recommendation can hold (`recommendation["actions"][i]["action"]`).
ACTIONS = (
    "none",               # nothing to do: the run recovered by itself
    "rollback",           # restore the checkpoint of `step`
    "skip_data",          # skip the batch(es): `sample_ids`, else `positions`, else `steps`
    "lower_lr",           # multiply the peak LR by `factor` (to `new_peak_lr`)
    "tighten_clip",       # clip the global gradient norm at `max_norm`
    "reset_moments",      # reset the optimizer moments of `tensors`
    "restore_scheduler",  # load the LR scheduler's state with the checkpoint (the jump is at a resume)
    "fix_schedule",       # the schedule itself jumped: hold the LR at `hold_lr` where it jumped, find the bug
    "load_state",         # resume with the model and optimizer state actually loaded
    "check_rank",         # rerun; take rank(s) `ranks` out if they fail again
    "guard_handled",      # a spikedoc.Guard already vetoed or rolled it back: nothing left to do
    "guard_acted",        # a spikedoc.Guard vetoed some of its steps; the advice after it still applies
)

#: Actions that ask nothing of the user: the run recovered by itself, or a guard already acted.
_NOTHING_TO_DO = ("none", "guard_handled", "guard_acted")


def to_act_on(recommendation: dict[str, Any]) -> list[dict[str, Any]]:
    """The actions of a recommendation that ask the user to do something (the CLI exits 1 for them).

    Example:
        >>> to_act_on({"actions": [{"action": "none"}, {"action": "skip_data"}]})
        [{'action': 'skip_data'}]
    """
    return [a for a in recommendation.get("actions", []) if a["action"] not in _NOTHING_TO_DO]


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


def recommend(
    incident: Incident,
    ev: Evidence,
    *,
    checkpoints: list[tuple[int, str | None, int | None]],
    clip: float | None,
    peak_lr: float | None,
    first_step: int,
    config: AnalysisConfig | None = None,
) -> dict[str, Any]:
    """What to do about one incident: decisions as data, each action with the evidence it rests on.

    Nothing here is worded for a reader beyond the `because` of each action; the report words them.

    Args:
        incident: with `cause`, `verdict` and `severity` decided.
        ev: its evidence.
        checkpoints: (step, path, overwritten_at) of checkpoints recorded on the incident's lineage;
            a checkpoint at step s holds the state before step s (the monitor's convention);
            `overwritten_at` is the step of a later event that wrote the same path (None: it still holds it).
        clip: the max norm in use (meta config `clip`, or inferred from clip_coef), None if unclipped.
        peak_lr: the schedule's intended peak before onset (never an LR after an upward jump), None if unknown.
        first_step: first step of the lineage (a rollback never goes before it).
        config: `lr_factor`.

    Returns:
        `rollback` (bool), `rollback_to_step`, `checkpoint_path`, `checkpoint_known` (these three None,
        None, False unless rolling back), `checkpoints_overwritten` (`path`, `overwritten_at` of clean
        checkpoints a later write replaced), `lr_factor`
        (None: no LR change advised), `new_peak_lr`, `clip_max_norm` (None: no clipping change),
        `hold_lr`, `skip_steps`, `skip_sample_ids`, `skip_sample_positions`,
        `reset_optimizer_state_for`, `actions` (dicts: `action` from ACTIONS, its parameters,
        `because`).
    """
    config = config or AnalysisConfig()
    cause = incident.cause
    skip = _skip_list(incident, ev)
    rollback = incident.verdict != "recovered" or cause == "state_reset"
    # The rollback fields say where to go only when going: a recovered run has no target to name.
    rec: dict[str, Any] = _rollback_target(incident, ev, checkpoints, first_step) if rollback else \
        {"rollback_to_step": None, "checkpoint_path": None, "checkpoint_known": False, "checkpoints_overwritten": []}
    rec["rollback"] = rollback
    rec.update(lr_factor=None, new_peak_lr=None, clip_max_norm=None, hold_lr=None,
               skip_steps=skip["steps"], skip_sample_ids=skip["sample_ids"], skip_sample_positions=skip["positions"],
               reset_optimizer_state_for=[])
    actions: list[dict[str, Any]] = []
    if incident.severity == "minor":
        # Nothing to undo; a broken schedule or device is still worth repairing before it strikes again.
        actions.append({"action": "none", "because": _recovered_because(incident) + "; the incident is minor"})
        rec["actions"] = _nothing_to_undo(actions + _repairs(incident, ev, rec, peak_lr))
        return rec
    if rec["rollback"]:
        actions.append({"action": "rollback", "step": rec["rollback_to_step"], "checkpoint": rec["checkpoint_path"],
                        "known": rec["checkpoint_known"], "overwritten": rec["checkpoints_overwritten"],
                        "because": _damage_because(incident)})
    else:
        actions.append({"action": "none", "because": _recovered_because(incident)})
    actions += _repairs(incident, ev, rec, peak_lr)
    if skip["steps"]:
        actions.append({"action": "skip_data", "steps": skip["steps"], "sample_ids": skip["sample_ids"],
                        "positions": skip["positions"], "because": _first_evidence(incident)})
    if cause == "numerics_rank" and not _rank_alone(ev):
        ev.notes.append("no LR or clipping change advised: nothing grew before the non-finite value, so a smaller "
                        "step would not have prevented it")
    if rec["rollback"] and cause in ("lr_too_high", "grad_explosion", "optimizer_state") and peak_lr:
        rec["lr_factor"] = config.lr_factor
        rec["new_peak_lr"] = peak_lr * config.lr_factor
        actions.append({"action": "lower_lr", "factor": config.lr_factor, "peak_lr": peak_lr, "new_peak_lr": rec["new_peak_lr"],
                        "because": f"cause {cause} with lasting damage at the LR in use (peak {fmt(peak_lr)})"})
    grad = _grad_evidence(incident, ev)
    if rec["rollback"] and grad and cause not in _REPAIR:
        share, steps = _clipped_share(ev)
        rec["clip_max_norm"] = tighter_clip(clip, clipped_share=share)
        if rec["clip_max_norm"] is not None:
            actions.append({"action": "tighten_clip", "max_norm": rec["clip_max_norm"], "was": clip, "because": grad})
        else:
            ev.notes.append(f"no tighter clipping advised: {clip_kept_because(clip, share, steps)}")
    if cause == "optimizer_state" and ev.layers is not None and ev.layers.precursors:
        rec["reset_optimizer_state_for"] = list(dict.fromkeys(p["name"] for p in ev.layers.precursors))
        actions.append({"action": "reset_moments", "tensors": rec["reset_optimizer_state_for"],
                        "because": ev.layers.precursors[0]["sentence"]})
    rec["actions"] = _nothing_to_undo(actions)
    return rec


def _rollback_target(incident: Incident, ev: Evidence, checkpoints: list[tuple[int, str | None, int | None]],
                     first_step: int) -> dict[str, Any]:  # fmt: skip
    bad = [b["step"] for b in ev.batches if b["anomalies"]] if incident.cause == "bad_batch" else []
    # The loss at onset is the first to show the update of the step before, unless the fault is the
    # onset step's own: its batch (bad_batch: high before its update), a state not loaded at a
    # resume, or a non-finite gradient of a step whose loss was finite (that step's batch or backward
    # broke, the state before it is good).
    first = ev.first_nonfinite if incident.cause == "numerics_rank" else None
    own = incident.cause == "bad_batch" or (incident.cause == "state_reset" and ev.resume is not None) \
        or (first is not None and first["loss_finite"])
    shown = (first["step"] if first is not None else incident.onset_step) - (0 if own else 1)
    # Where the cause dates the fault itself (the first non-finite value, the LR jump, the bad batch),
    # a tensor's departure counts only as a build-up (within `build_up_window`): one of dozens of
    # tensors off its history tens of steps earlier happens in healthy runs too. Otherwise (a state
    # changed, a cause unknown) the earliest departure may be the fault's real start.
    pinned = first is not None or bad or (incident.cause == "lr_schedule" and ev.lr_jump is not None)
    departed = [] if ev.layers is None or ev.layers.earliest_step is None else [ev.layers.earliest_step]
    earliest = min([shown] + bad
                   + ([ev.build_up["step"]] if ev.build_up else [] if pinned else departed)
                   + ([ev.grad_precursor["step"]] if ev.grad_precursor else [])
                   + ([ev.lr_jump["step"]] if incident.cause == "lr_schedule" and ev.lr_jump else []))
    # A checkpoint event at step s holds the state after steps 0..s-1 (resuming re-runs step s), so
    # it is clean when s <= the first affected step, and its file still holds it unless a later
    # event wrote the same path again.
    before = [c for c in checkpoints if c[0] <= earliest]
    holding = [c for c in before if c[2] is None]
    # The latest overwrite of each path that held a clean state: what the advice must warn about.
    gone = {p: w for s, p, w in sorted(c for c in before if c[2] is not None)}
    overwritten = [{"path": p, "overwritten_at": int(w)} for p, w in gone.items()]
    if holding:
        step, path, _ = max(holding, key=lambda c: c[0])
        return {"rollback_to_step": int(step), "checkpoint_path": path, "checkpoint_known": True,
                "checkpoints_overwritten": [o for o in overwritten if o["path"] != path]}
    # No file holds a clean state: the newest state before the fault is the one to look for.
    return {"rollback_to_step": int(max(first_step, earliest)), "checkpoint_path": None, "checkpoint_known": False,
            "checkpoints_overwritten": overwritten}


def _skip_list(incident: Incident, ev: Evidence) -> dict[str, list[Any]]:
    """What an incident skips: for `bad_batch` the anomalous batches, else the onset step's batch; for
    numerics out of nowhere (no rank alone), the batch of the step whose value first went non-finite."""
    if incident.cause == "bad_batch":
        bad = [b for b in ev.batches if b["anomalies"]] or [b for b in ev.batches if b["step"] == incident.onset_step]
        bad += ev.stretch
    elif incident.cause == "numerics_rank" and ev.first_nonfinite is not None and not _rank_alone(ev):
        step = ev.first_nonfinite["step"]
        bad = [b for b in ev.batches if b["step"] == step] or [{"step": step, "sample_ids": [], "outlier_sample_ids": [], "positions": None}]
    else:
        return {"steps": [], "sample_ids": [], "positions": []}
    ids, positions = [], []
    for b in bad:
        ids += b["outlier_sample_ids"] or b["sample_ids"]
        if not b["sample_ids"] and b["positions"]:
            if positions and positions[-1][1] == b["positions"][0]:  # contiguous stream: one range
                positions[-1][1] = b["positions"][1]
            else:
                positions.append(list(b["positions"]))
    steps = sorted({int(b["step"]) for b in bad}) or [incident.onset_step]
    return {"steps": steps, "sample_ids": list(dict.fromkeys(ids)), "positions": positions}


def _repairs(incident: Incident, ev: Evidence, rec: dict[str, Any], peak_lr: float | None) -> list[dict[str, Any]]:
    cause = incident.cause
    if cause == "lr_schedule" and ev.lr_jump is not None:
        jump = ev.lr_jump
        rec["lr_factor"], rec["new_peak_lr"], rec["hold_lr"] = 1.0, peak_lr, jump["before"]
        said = (f"the LR jumped {fmt(jump['before'])} -> {fmt(jump['after'])} at step {jump['step']}")
        if jump.get("at_resume") is not None:
            return [{"action": "restore_scheduler", "step": jump["step"], "peak_lr": peak_lr,
                     "because": said + f", where segment {jump['at_resume']} resumed the run"}]
        return [{"action": "fix_schedule", "step": jump["step"], "hold_lr": jump["before"], "peak_lr": peak_lr,
                 "because": said + " and no resume happened there: the schedule itself (its code or settings) jumped"}]
    if cause == "state_reset":
        return [{"action": "load_state", "because": incident.evidence[0] if incident.evidence else "state reset"}]
    if cause == "numerics_rank" and _rank_alone(ev):
        off = ev.ranks["off_ranks"]
        return [{"action": "check_rank", "ranks": off, "loss_scaled": ev.loss_scale is not None,
                 "because": incident.evidence[0] if incident.evidence else "numerics"}]
    return []


def _rank_alone(ev: Evidence) -> bool:
    return bool(ev.ranks and ev.ranks["alone"])


def _nothing_to_undo(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`none` followed by other advice (a repair, data to skip) means nothing to undo in this run (no
    rollback), not nothing to do."""
    if actions and actions[0]["action"] == "none":
        actions[0]["advice_follows"] = len(actions) > 1
    return actions


def _clipped_share(ev: Evidence) -> tuple[float, int]:
    """Share of steps the clip acted on before the incident (earlier in the run when known, else in
    the lookback: clipping that only just started to act is a growing gradient, not the run's norm)."""
    c = ev.clipping
    if not c:
        return 0.0, 0
    if math.isfinite(c["run_share"]):
        return c["run_share"], c["run_steps"]
    return c["share"], c["steps"]


def _grad_evidence(incident: Incident, ev: Evidence) -> str | None:
    """Why tighter clipping would have helped: the gradient norm itself was flagged or was growing."""
    grad = incident.series.get("grad_norm")
    if grad is not None and not grad.get("level_sigma"):
        return (f"the gradient norm reached {fmt(grad['peak_value'])} ({times(grad['peak_ratio'])} its baseline) "
                f"at step {grad['peak_step']}")
    if ev.grad_precursor is not None:
        return ev.grad_precursor["sentence"]
    if ev.clipping and ev.clipping["saturated"]:
        return f"clipping was active on {ev.clipping['share']:.0%} of the steps before onset"
    return None


def _recovered_because(incident: Incident) -> str:
    d = incident.damage
    if not d:
        return (f"back in the detector's band at step {incident.recovery_step}; with no loss before onset to "
                "compare with, lasting damage could not be judged")
    return (f"back on its pre-incident trajectory from step {d['back_step']} and still there {steps_text(d['observed_steps'])} after "
            f"the incident (excess {_pct(d['excess_ratio'])}, {fmt(d['excess_sigma'], 2)} sigma)")


def _damage_because(incident: Incident) -> str:
    d = incident.damage
    if incident.cause == "state_reset" and incident.verdict == "recovered":
        return "the model's state was reset: the steps since are training from scratch"
    if not d:
        return f"verdict {incident.verdict}: the loss did not come back into the detector's band"
    if not math.isfinite(d["excess_ratio"]):
        return f"verdict {incident.verdict}: the loss is non-finite at step {d['damage_step']}"
    if incident.verdict == "recovered_with_damage" and math.isfinite(d.get("shift_z", math.nan)):
        return (f"verdict {incident.verdict}: back in the band from step {d['back_step']}, but over the "
                f"{d['shift_steps']} steps since the loss is on average {_pct(d['shift_ratio'])} above its pre-incident "
                f"trajectory, {fmt(d['shift_z'], 2)} standard errors (autocorrelation-robust): a lasting shift")
    return (f"verdict {incident.verdict}: at step {d['damage_step']} the loss is {_pct(d['excess_ratio'])} above its "
            f"pre-incident trajectory ({fmt(d['excess_sigma'], 2)} sigma)")


def _first_evidence(incident: Incident) -> str:
    """The first evidence sentence of the incident's cause."""
    return incident.evidence[0] if incident.evidence else incident.cause


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%" if math.isfinite(value) else str(value)
