"""The recommendation that follows from an incident's cause: decisions as data, each with its evidence."""

from __future__ import annotations

import math
from typing import Any

from spikedoc.analysis._robust import fmt, steps_text, times
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.evidence import Evidence
from spikedoc.analysis.incident import Incident

__all__ = ["recommend", "tighter_clip", "clip_kept_because", "to_act_on", "ACTIONS"]

# Causes whose fix is to repair the run's state or setup rather than to train more conservatively.
_REPAIR = ("lr_schedule", "state_reset", "numerics_rank")


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
    "find_state_writer",  # the optimizer state was written from outside the optimizer at `step`: find what wrote it
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



def recommend(
    incident: Incident,
    ev: Evidence,
    *,
    checkpoints: list[tuple[int, str | None, int | None]],
    clip: float | None,
    peak_lr: float | None,
    first_step: int,
    config: AnalysisConfig | None = None,
    unrecovered: Incident | None = None,
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
        unrecovered: the earliest incident before this one on its lineage that advised a rollback (it
            did not recover, or reset the state): the state before it is the last healthy one, so a
            rollback never stops after its target.

    Returns:
        `rollback` (bool), `rollback_to_step`, `checkpoint_path`, `checkpoint_known` (these three None,
        None, False unless rolling back), `checkpoints_overwritten` (`path`, `overwritten_at` of clean
        checkpoints a later write replaced), `lr_factor`
        (None: no LR change advised), `new_peak_lr`, `clip_max_norm` (None: no clipping change),
        `hold_lr`, `skip_steps`, `skip_sample_ids`, `skip_sample_positions` (and
        `skip_sample_positions_from`: the resume step they are counted from, None when counted from
        the run's start),
        `reset_optimizer_state_for`, `actions` (dicts: `action` from ACTIONS, its parameters,
        `because`).
    """
    config = config or AnalysisConfig()
    cause = incident.cause
    skip = _skip_list(incident, ev)
    rollback = incident.verdict != "recovered" or cause == "state_reset"
    # The rollback fields say where to go only when going: a recovered run has no target to name.
    not_after = unrecovered.recommendation["rollback_to_step"] if unrecovered is not None else None
    rec: dict[str, Any] = _rollback_target(incident, ev, checkpoints, first_step, not_after) if rollback else \
        {"rollback_to_step": None, "checkpoint_path": None, "checkpoint_known": False, "checkpoints_overwritten": []}
    rec["rollback"] = rollback
    rec.update(lr_factor=None, new_peak_lr=None, clip_max_norm=None, hold_lr=None,
               skip_steps=skip["steps"], skip_sample_ids=skip["sample_ids"], skip_sample_positions=skip["positions"],
               skip_sample_positions_from=skip["positions_from"],
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
                        "because": _damage_because(incident, ev) + _earlier_because(unrecovered)})
    else:
        actions.append({"action": "none", "because": _recovered_because(incident)})
    actions += _repairs(incident, ev, rec, peak_lr)
    if skip["steps"]:
        actions.append({"action": "skip_data", "steps": skip["steps"], "sample_ids": skip["sample_ids"],
                        "positions": skip["positions"], "positions_from": skip["positions_from"],
                        "because": _first_evidence(incident)})
    # A non-finite value out of nowhere is numerics whatever the evidence before it names (a batch, a
    # state): a smaller step or a tighter clip does not prevent an overflow or a corrupted value.
    sudden = ev.nonfinite_out_of_nowhere and not _rank_alone(ev)
    if sudden:
        ev.notes.append("no LR or clipping change advised: nothing grew before the non-finite value, so a smaller "
                        "step would not have prevented it")
    written = _state_written(incident, ev)  # a bug to find, not an optimisation to tune
    tune = rec["rollback"] and not written and not sudden
    if tune and cause in ("lr_too_high", "grad_explosion", "optimizer_state") and peak_lr:
        rec["lr_factor"] = config.lr_factor
        rec["new_peak_lr"] = peak_lr * config.lr_factor
        actions.append({"action": "lower_lr", "factor": config.lr_factor, "peak_lr": peak_lr, "new_peak_lr": rec["new_peak_lr"],
                        "because": f"cause {cause} with lasting damage at the LR in use (peak {fmt(peak_lr)})"})
    grad = _grad_evidence(incident, ev)
    if tune and grad and cause not in _REPAIR:
        share, steps = _clipped_share(ev)
        rec["clip_max_norm"] = tighter_clip(clip, clipped_share=share)
        if rec["clip_max_norm"] is not None:
            actions.append({"action": "tighten_clip", "max_norm": rec["clip_max_norm"], "was": clip, "because": grad})
        else:
            ev.notes.append(f"no tighter clipping advised: {clip_kept_because(clip, share, steps)}")
    # A moment written from outside (this incident's or an earlier one's precursor) is not reset by hand:
    # its writer is to be found, and the rollback before it puts sound moments back.
    if cause == "optimizer_state" and ev.layers is not None and ev.layers.precursors \
            and not any(p.get("overwritten") for p in ev.layers.precursors):  # fmt: skip
        rec["reset_optimizer_state_for"] = list(dict.fromkeys(p["name"] for p in ev.layers.precursors))
        actions.append({"action": "reset_moments", "tensors": rec["reset_optimizer_state_for"],
                        "because": ev.layers.precursors[0]["sentence"]})
    rec["actions"] = _nothing_to_undo(actions)
    return rec


def _rollback_target(incident: Incident, ev: Evidence, checkpoints: list[tuple[int, str | None, int | None]],
                     first_step: int, not_after: int | None = None) -> dict[str, Any]:  # fmt: skip
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
                   + ([ev.lr_jump["step"]] if incident.cause == "lr_schedule" and ev.lr_jump else [])
                   + _state_changed(incident, ev)
                   + ([not_after] if not_after is not None else []))
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


def _state_changed(incident: Incident, ev: Evidence) -> list[int]:
    """Steps from which the optimizer state was no longer the run's own (the state before them is the
    last sound one), whatever else dates the onset: a moment beyond its optimizer's exact bound at the
    onset was written there, whatever cause the incident names; an `optimizer_state` cause also rests
    on the update-norm tests, which date the first update the changed state made (alone when there are
    no per-tensor statistics: the loss can show that update a step or two late)."""
    layers = ev.layers.precursors if ev.layers is not None else []
    steps = [p["step"] for p in layers if p.get("overwritten") and p.get("at_onset") and p["step"] is not None]
    if incident.cause == "optimizer_state":
        steps += [ev.update_step["step"]] if ev.update_step and ev.update_step["fired"] else []
        steps += [ev.state_jump] if ev.state_jump is not None else []
    return steps


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
        return {"steps": [], "sample_ids": [], "positions": [], "positions_from": None}
    ids, positions = [], []
    for b in bad:
        ids += b["outlier_sample_ids"] or b["sample_ids"]
        if not b["sample_ids"] and b["positions"]:
            if positions and positions[-1][1] == b["positions"][0]:  # contiguous stream: one range
                positions[-1][1] = b["positions"][1]
            else:
                positions.append(list(b["positions"]))
    steps = sorted({int(b["step"]) for b in bad}) or [incident.onset_step]
    # The batches of one incident lie in one segment: positions counted from its resume, or in the stream.
    since = next((b["positions_from"] for b in bad if b.get("positions_from") is not None), None)
    return {"steps": steps, "sample_ids": list(dict.fromkeys(ids)), "positions": positions,
            "positions_from": since if positions else None}


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
                 "replay": rec["rollback"], "because": said + " and no resume happened there: the schedule itself (its code or settings) jumped"}]
    if cause == "state_reset":
        # A reset at a resume is that resume's load; elsewhere nothing says which code set the weights back.
        return [{"action": "load_state", "step": incident.onset_step, "at_resume": ev.resume.segment if ev.resume else None,
                 "because": incident.evidence[0] if incident.evidence else "state reset"}]
    written = _state_written(incident, ev)
    if written:
        first = min(written, key=lambda p: p["step"])  # seen at a later measurement when statistics were skipped between
        return [{"action": "find_state_writer", "step": first["step"], "seen": first.get("seen", first["step"]),
                 "tensors": list(dict.fromkeys(p["name"] for p in written)), "because": written[0]["sentence"]}]
    if cause == "numerics_rank" and _rank_alone(ev):
        off = ev.ranks["off_ranks"]
        return [{"action": "check_rank", "ranks": off, "loss_scaled": ev.loss_scale is not None,
                 "because": incident.evidence[0] if incident.evidence else "numerics"}]
    return []


def _state_written(incident: Incident, ev: Evidence) -> list[dict[str, Any]]:
    """The optimizer-state precursors at the onset of an `optimizer_state` incident that fell further
    than the optimizer's own updates allow (`overwritten`): something outside it wrote the state."""
    if incident.cause != "optimizer_state" or ev.layers is None:
        return []
    return [p for p in ev.layers.precursors if p.get("overwritten") and p.get("at_onset")]


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
    # An incident that lasts to the run's last step leaves no step after it to stay on the trajectory.
    stayed = (f"still there {steps_text(d['observed_steps'])} after the incident" if d["observed_steps"] else
              f"there up to step {d['damage_step']}, the last step, where the incident ends")
    if d["back_step"] is None:  # the run ended before `hold_steps` steps could confirm it
        return (f"on its pre-incident trajectory over the {steps_text(d['observed_steps'] + 1)} the run has from the "
                f"incident's end, too few to confirm a recovery (excess {_pct(d['excess_ratio'])}, "
                f"{fmt(d['excess_sigma'], 2)} sigma)")
    return f"back on its pre-incident trajectory from step {d['back_step']} and {stayed} ({_shift_words(d)})"


def _shift_words(d: dict[str, Any]) -> str:
    """The statistic a recovered verdict rests on: the mean shift since recovery against its standard error
    (one step's excess in per-step sigmas can be large where the trajectory wanders, and decides nothing)."""
    if math.isfinite(d.get("shift_z", math.nan)) and d.get("shift_steps"):
        return (f"over the {d['shift_steps']} steps since, {_pct(d['shift_ratio'])} against it on average, "
                f"{fmt(d['shift_z'], 2)} standard errors: below what counts as lasting damage")
    return f"excess {_pct(d['excess_ratio'])}, {fmt(d['excess_sigma'], 2)} sigma"


def _damage_because(incident: Incident, ev: Evidence) -> str:
    d = incident.damage
    if incident.cause == "state_reset" and incident.verdict == "recovered":
        if ev.resume is not None and not ev.resume.state_reset:
            # The loss went on from where the run was (the weights were loaded): only the moments are not the run's.
            ratio = f" (Adam's exp_avg_sq {fmt(ev.moments_ratio, 2)}x its value before it)" if ev.moments_ratio is not None else ""
            return (f"the resume at step {ev.resume.step} loaded the weights but not the optimizer's moments{ratio}: the "
                    "steps since were taken with moments the run had not built")
        return "the model's state was reset: the steps since are training from scratch"
    if not d:
        return f"verdict {incident.verdict}: the loss did not come back into the detector's band"
    if not math.isfinite(d["excess_ratio"]):
        # The judgement stops where the non-finite losses decide it (`nonfinite_steps` in a row), not where they began.
        return (f"verdict {incident.verdict}: the loss went non-finite and stayed so (still non-finite at step "
                f"{d['damage_step']}, where the judgement ended)")
    if incident.verdict == "recovered_with_damage" and math.isfinite(d.get("shift_z", math.nan)):
        return (f"verdict {incident.verdict}: back in the band from step {d['back_step']}, but over the "
                f"{d['shift_steps']} steps since the loss is on average {_pct(d['shift_ratio'])} above its pre-incident "
                f"trajectory, {fmt(d['shift_z'], 2)} standard errors (autocorrelation-robust): a lasting shift")
    return (f"verdict {incident.verdict}: at step {d['damage_step']} the loss is {_pct(d['excess_ratio'])} above its "
            f"pre-incident trajectory ({fmt(d['excess_sigma'], 2)} sigma)")


def _earlier_because(unrecovered: Incident | None) -> str:
    """Why the rollback goes back before an earlier incident that left its state behind (`unrecovered`)."""
    if unrecovered is None:
        return ""
    if unrecovered.cause == "state_reset":
        return (f"; the state was reset at the incident at step {unrecovered.onset_step} before it, so the state to "
                "return to is the one before that")
    return (f"; the run had not recovered from the incident at step {unrecovered.onset_step} before it, so the state "
            "to return to is the one before that")


def _first_evidence(incident: Incident) -> str:
    """The first evidence sentence of the incident's cause."""
    return incident.evidence[0] if incident.evidence else incident.cause


def _pct(value: float) -> str:
    return f"{100 * value:+.1f}%" if math.isfinite(value) else str(value)

