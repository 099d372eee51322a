"""What a `spikedoc.Guard` did in a run: its events (vetoes, checkpoints, rollbacks, a stop), in order."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

__all__ = ["GUARD_EVENT_KINDS", "guard_actions", "cause_status", "withheld_steps", "without_guard_lr_changes", "guard_handling"]

#: Event kinds the guard records; its checkpoints are `checkpoint` events with `guard: true`.
GUARD_EVENT_KINDS = ("veto", "rollback", "data_skip", "guard_stop", "guard_resume", "checkpoint_failed",
                     "checkpoint_refused", "replay")

#: Actions taken on a cause, whose cause `cause_status` tells confirmed by a replay, measured or inferred.
_ACTED = ("veto", "rollback", "data_skip", "guard_stop")
#: What a replay test can conclude (`spikedoc.guard.replay`).
_FOUND = ("data", "state", "transient", "not_data")


def guard_actions(events: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The guard's events of a run (one rank's: every rank records the same decisions), oldest first.

    Args:
        events: `Run.events` (`step`, `segment`, `time`, `kind`, `detail` as a JSON string, `rank`).

    Returns:
        One dict per action: `kind`, `step` (for a rollback, the step it returned to), `segment`,
        `detail` (the event's detail as a dict), and for a veto, rollback, data skip or stop
        `cause` (`cause_status`).

    Example:
        >>> events = pd.DataFrame({"step": [70], "segment": [0], "time": [0.0], "kind": ["veto"],
        ...                        "detail": ['{"reasons": ["nonfinite"]}'], "rank": [0]})
        >>> guard_actions(events)[0]["detail"]["reasons"]
        ['nonfinite']
    """
    if events is None or events.empty or not {"kind", "detail", "step"} <= set(events.columns):
        return []
    if "rank" in events.columns and events["rank"].nunique() > 1:
        events = events.loc[events["rank"] == events["rank"].min()]
    out: list[dict[str, Any]] = []
    for row in events.sort_values("time", kind="stable").itertuples(index=False):
        try:
            detail = json.loads(row.detail or "{}")
        except (TypeError, ValueError):
            detail = {}
        detail = detail if isinstance(detail, dict) else {}
        if row.kind in GUARD_EVENT_KINDS or (row.kind == "checkpoint" and detail.get("guard") is True):
            segment = getattr(row, "segment", 0)
            action = {"kind": row.kind, "step": int(row.step), "segment": int(segment) if segment == segment else 0,
                      "detail": detail}  # fmt: skip
            if row.kind in _ACTED:
                action["cause"] = cause_status(row.kind, detail)
            if row.kind == "replay" and detail.get("replay") == "lr_before_jump":
                _confirm_schedule(out, detail)
            out.append(action)
    return out


def _confirm_schedule(actions: list[dict[str, Any]], finding: dict[str, Any]) -> None:
    """The rollback an `lr_before_jump` replay event confirms (recorded after it): the last one before it."""
    rollback = next((a for a in reversed(actions) if a["kind"] == "rollback"), None)
    if rollback is not None:
        rollback["detail"] = {**rollback["detail"], "lr_confirmed": finding}
        rollback["cause"] = cause_status("rollback", rollback["detail"])


def cause_status(kind: str, detail: dict[str, Any]) -> dict[str, Any]:
    """Whether the cause a guard action acted on was confirmed by a replay, and by which, or only inferred.

    The replays the guard runs (`spikedoc.guard.replay`): `other_batches` (the last healthy step's
    batches given to the state the vetoes came from: the state broken, or sound so the data is
    suspected), `same_batches` (the suspect step's batches again on a good state: `data` when the
    fault reproduces, `transient` when it does not on the same sound state, `not_data` when the
    batches are ordinary on the rollback's good checkpoint; or a data skip whose batches follow
    those a rollback skipped), `from_good_checkpoint` (the fault came back after a rollback to a
    good checkpoint: the state or the loop), `lr_before_jump` (the replay of a rollback with the LR
    held before a jump, and nothing else changed, passed the step it rolled back from: the
    schedule). The test's conclusion (`found` of the `cause_test`) is the cause confirmed; a test
    that only ruled the data out leaves the cause `inferred`, with `ruled_out: ["data"]`. A veto,
    and a rollback on the judgement alone, are `inferred`. A veto or rollback on collapsed second
    moments is `measured`: the optimizer's state was read below what any update of it allows,
    which names the state without a replay.

    Returns:
        `status` (`confirmed`, `measured` or `inferred`), `replays` (each `replay`, `found`, and `step`
        for a replay step), `found` (`data`, `state`, `schedule`, `transient`, or for an inferred
        cause the judgement's own: the rollback's `cause`, the veto's reasons) and, when a replay
        ruled the data out, `ruled_out`.

    Example:
        >>> cause_status("rollback", {"cause": "damage", "evidence": {"cause_test": {"replay": "other_batches",
        ...              "probe_step": 48, "found": "state"}}})["status"]
        'confirmed'
    """
    evidence = detail.get("evidence") if kind == "rollback" else detail
    if kind == "guard_stop":
        evidence = (detail.get("decision") or {}).get("evidence")
    evidence = evidence if isinstance(evidence, dict) else {}
    replays: list[dict[str, Any]] = []
    found = None
    if kind == "data_skip" and detail.get("after_rollback", True):  # recordings before the field: always after one
        replays.append({"replay": "same_batches", "found": "data"})
        found = "data"
    test = evidence.get("cause_test")
    if isinstance(test, dict) and test.get("found") in _FOUND:
        for r in test.get("replays") or [test]:  # recordings before `replays`: the one probe
            replays.append({"replay": r.get("replay", "other_batches"), "on": r.get("on", "vetoed_state"), "found": r.get("found"),
                            "step": r.get("probe_step")})  # fmt: skip
        found = test["found"]
    if (kind == "rollback" and detail.get("recurring")) or (kind == "guard_stop" and detail.get("reason") == "recurring"):
        replays.append({"replay": "from_good_checkpoint", "found": "state"})
        found = "state"
    confirmed = detail.get("lr_confirmed") if kind == "rollback" else None
    if isinstance(confirmed, dict):
        replays.append({"replay": "lr_before_jump", "found": "schedule", "step": confirmed.get("passed_step")})
        found = "schedule"
    if found is not None and found != "not_data":
        return {"status": "confirmed", "replays": replays, "found": found}
    if "optimizer_state_collapsed" in (detail.get("reasons") or []) or (kind == "rollback" and detail.get("cause") == "optimizer_state"):
        return {"status": "measured", "replays": [], "found": "state"}
    judged = detail.get("cause") if kind == "rollback" else ", ".join(detail.get("reasons") or []) or detail.get("reason")
    out: dict[str, Any] = {"status": "inferred", "replays": replays, "found": judged}
    if found == "not_data":
        out["ruled_out"] = ["data"]
    return out


def withheld_steps(actions: list[dict[str, Any]]) -> set[tuple[int, int]]:
    """The (segment, step) pairs whose update a guard withheld: its vetoes and its replay steps
    (judged, never applied). The monitor records them as skipped, as it records a loss scaler's
    overflow skip; these are the guard's.

    Example:
        >>> acts = [{"kind": "veto", "step": 57, "segment": 0, "detail": {}},
        ...         {"kind": "replay", "step": 61, "segment": 0, "detail": {"probe_step": 60}}]
        >>> sorted(withheld_steps(acts))
        [(0, 57), (0, 60)]
    """
    out = {(int(a["segment"]), int(a["step"])) for a in actions if a["kind"] == "veto"}
    replayed = [(a["segment"], (a.get("detail") or {}).get("probe_step")) for a in actions if a["kind"] == "replay"]
    return out | {(int(g), int(step)) for g, step in replayed if isinstance(step, int)}


def without_guard_lr_changes(jumps: list[dict[str, Any]], actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The LR discontinuities not made by the guard: a downward step where a guard rollback resumed
    (the schedule scaled by its `lr_factor` on purpose) is the remedy, and an upward step where a
    data skip undid that cut (`remedy_reverted`) is its undo; neither is a finding or a cause. Nor is
    a replay on a checkpoint: its row carries the checkpoint's LR (the step is judged there and
    never applied), so the LR steps to it and, where training goes on, back from it.

    Example:
        >>> acts = [{"kind": "rollback", "step": 40, "detail": {}}, {"kind": "data_skip", "step": 47, "detail": {"remedy_reverted": True}},
        ...         {"kind": "replay", "step": 61, "detail": {"on": "checkpoint", "probe_step": 61}}]
        >>> without_guard_lr_changes([{"step": 40, "direction": "down"}, {"step": 47, "direction": "up"},
        ...                           {"step": 61, "direction": "up"}, {"step": 62, "direction": "down"}], acts)
        []
    """
    cut = {a["step"] for a in actions if a["kind"] == "rollback"}
    undone = {a["step"] for a in actions if a["kind"] == "data_skip" and (a.get("detail") or {}).get("remedy_reverted")}
    probes = [(a.get("detail") or {}) for a in actions if a["kind"] == "replay"]
    on_checkpoint = {int(d["probe_step"]) for d in probes if d.get("on") == "checkpoint" and isinstance(d.get("probe_step"), int)}
    return [j for j in jumps if not (j.get("direction") == "down" and j.get("step") in cut)
            and not (j.get("direction") == "up" and j.get("step") in undone)
            and not ({j.get("step"), j.get("step", 0) - 1} & on_checkpoint)]


def guard_handling(onset: int, end: int, segment: int, actions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the guard already did about an incident: the steps of it it vetoed, and the rollback
    that undid it (one that returned to a step at or before onset from a step after it).

    Returns None when the guard did nothing about it; else `vetoed` (steps), `probes` (its replay
    steps from onset up to the rollback: never applied either), `rollback` (the action or None), `handled`
    (rolled back, or every flagged step vetoed or probed) and `because`.

    Example:
        >>> acts = [{"kind": "veto", "step": 151, "segment": 0, "detail": {}},
        ...         {"kind": "rollback", "step": 150, "segment": 1, "detail": {"from_step": 152, "to_step": 150}}]
        >>> guard_handling(151, 151, 0, acts)["handled"]
        True
    """
    vetoed = [a["step"] for a in actions if a["kind"] == "veto" and a["segment"] == segment and onset <= a["step"] <= end]
    rollback = next((a for a in actions if a["kind"] == "rollback" and a["segment"] > segment
                     and a["detail"].get("to_step", a["step"]) <= onset < a["detail"].get("from_step", -1)), None)  # fmt: skip
    # A replay step (its `replay` event) is judged and never applied either, up to the rollback it preceded.
    last = max(end, rollback["detail"]["from_step"] - 1) if rollback is not None else end
    probes = [a["step"] for a in actions if a["kind"] == "replay" and a["segment"] == segment and onset <= a["step"] <= last]
    if not vetoed and rollback is None:
        return None
    parts = []
    if vetoed:
        parts.append(f"the guard vetoed step{'s' if len(vetoed) > 1 else ''} {_ranges(vetoed)} (never applied)")
    if vetoed and probes:
        parts.append(f"it replayed step{'s' if len(probes) > 1 else ''} {_ranges(probes)} to find the cause (never applied)")
    if rollback is not None:
        d = rollback["detail"]
        parts.append(f"it rolled back from step {d.get('from_step')} to {d.get('to_step', rollback['step'])}"
                     + (f" with the LR x{d['lr_scale']:g}" if isinstance(d.get("lr_scale"), (int, float)) else "")
                     + (f", clipping at {d['clip']:g}" + (" (kept: it already acted on most steps)" if d.get("clip_kept") else "")
                        if isinstance(d.get("clip"), (int, float)) else "")
                     + (f", {len(d['skipped_positions'])} batches skipped" if d.get("skipped_positions") else ""))
        undone = _reverted_by(rollback, actions)
        if undone is not None:
            parts.append(f"its LR cut and clipping were undone at step {undone['step']}, when the vetoes went on over "
                         "the data right after the skipped batches: the data was at fault, not the weights")
    # A probe is never applied either: vetoes and probes together covering every flagged step handled it.
    handled = rollback is not None or set(range(onset, end + 1)) <= set(vetoed) | set(probes)
    return {"vetoed": vetoed, "probes": probes, "rollback": rollback, "handled": handled, "because": "; ".join(parts)}


def _ranges(steps: list[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 2 and steps[-1] - steps[0] == len(steps) - 1 else ", ".join(map(str, steps))


def _reverted_by(rollback: dict[str, Any], actions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The data skip that undid `rollback`'s LR and clipping change, if one did before the next rollback."""
    for a in actions[next(i for i, x in enumerate(actions) if x is rollback) + 1:]:
        if a["kind"] == "rollback":
            return None
        if a["kind"] == "data_skip" and a["detail"].get("remedy_reverted"):
            return a
    return None
