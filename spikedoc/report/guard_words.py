"""How the reports word the guard's actions and their causes (the terminal report, the HTML report, `tail`)."""

from __future__ import annotations

from typing import Any

from spikedoc.analysis._robust import fmt
from spikedoc.report._numbers import table_number

__all__ = ["action_line", "cause_words", "value_text"]

#: How the report names each replay that confirms a guard action's cause (`cause_status`).
_REPLAY_WORDS = {
    "other_batches": "the last healthy batches replayed on the vetoed state",
    "same_batches": "the same data replayed from a good state",
    "from_good_checkpoint": "the fault came back after a rollback to a good checkpoint",
    "lr_before_jump": "the replay with the LR held before the jump passed the step",
}
#: How the report names what a replay found.
_FOUND_WORDS = {"not_data": "not the data", "transient": "a transient fault (it did not reproduce)"}
#: What the last healthy batches replayed on the rollback's good checkpoint found (a reference, not a cause).
_ON_CHECKPOINT = {"data": "in band on the good checkpoint",
                  "state": "out of band on the good checkpoint too: the state or the loop, not the batches"}


def _replay_words(r: dict[str, Any]) -> str:
    """One replay of a cause test: what ran and what it found."""
    if r.get("replay") == "other_batches" and r.get("on") == "checkpoint":
        return f"the last healthy batches replayed on the good checkpoint: {_ON_CHECKPOINT.get(r.get('found'), r.get('found'))}"
    return f"{_REPLAY_WORDS.get(r.get('replay'), r.get('replay'))}: {_FOUND_WORDS.get(r.get('found'), r.get('found'))}"


def cause_words(cause: dict[str, Any]) -> str:
    """A guard action's cause as `cause_status` decided it: confirmed by which replays, measured, or inferred."""
    replays = "; ".join(_replay_words(r) for r in cause.get("replays") or [])
    if cause.get("status") == "confirmed":
        found = cause.get("found")
        return f"cause confirmed by replay ({replays}): " + _FOUND_WORDS.get(found, f"the {found}")
    if cause.get("status") == "measured":
        return "cause measured: the optimizer's second moments were read below what one update allows"
    if cause.get("ruled_out"):
        return f"cause inferred ({cause.get('found') or 'the judgement'}); not the data, by replay ({replays})"
    return f"cause inferred ({cause.get('found') or 'the judgement'}), not replayed"


def action_line(a: dict[str, Any]) -> str:
    """One guard action (`guard_actions`) in words: `veto of step 57: nonfinite ...`, with its cause when known."""
    d = a["detail"]
    if a["kind"] == "veto":
        z = ", ".join(f"{k} {table_number(d[k])}" for k in ("loss_z", "grad_norm_z") if isinstance(d.get(k), (int, float)))
        line = (f"veto of step {a['step']}: {', '.join(d.get('reasons', []))}" + (f" ({z} sigma)" if z else "")
                + (f", the loss of rank {d['loss_rank']}" if d.get("loss_rank") is not None else "")
                + (f", data position{'s' if len(d['positions']) > 1 else ''} {', '.join(str(x) for x in d['positions'])} "
                   "(batches drawn)" if d.get("positions") else ""))
    elif a["kind"] == "rollback":
        own = " (the loop's own)" if d.get("clip_of_loop") else ""
        line = (f"rollback from step {d.get('from_step')} to {a['step']} ({d.get('reason')}, cause {d.get('cause')}): "
                + ("the good state put back, nothing else changed" if d.get("cause") == "optimizer_state"
                   else f"LR held at {value_text(d['lr_held'].get('at'))} from step {d['lr_held'].get('from_step')}" if d.get("lr_held")
                   else f"LR x{value_text(d.get('lr_scale'))} of the original, "
                        + (f"clip {value_text(d.get('clip'))} kept (it already acted on most steps)" if d.get("clip_kept")
                           else f"clip {value_text(d.get('clip_before'))}{own} -> {value_text(d.get('clip'))}")
                        + f", {len(d.get('skipped_positions') or [])} batches skipped"))
    elif a["kind"] == "data_skip":
        steps = d.get("steps") or []
        line = (f"data skip at step {a['step']}: steps {'-'.join(str(x) for x in steps)} vetoed on a corrupt stretch of "
                f"data, {len(d.get('positions') or [])} batches skipped without rolling back"
                + ("; the last rollback's LR cut and clipping undone" if d.get("remedy_reverted") else ""))
    elif a["kind"] == "guard_stop":
        line = f"stopped at step {a['step']}: {d.get('reason')}"
    elif a["kind"] == "replay" and d.get("replay") == "lr_before_jump":
        line = (f"replay with the LR held before the jump at step {d.get('jump_step')} passed step {d.get('from_step')} "
                "with nothing else changed: found the schedule at fault")
    elif a["kind"] == "replay":
        found, on_checkpoint = d.get("found"), d.get("on") == "checkpoint"
        said = (_ON_CHECKPOINT.get(found, str(found)) if on_checkpoint and d.get("replay") == "other_batches"
                else f"found the {found} at fault" if found in ("data", "state") else _FOUND_WORDS.get(found, str(found)))  # fmt: skip
        line = (f"replay at step {a['step']} ({str(d.get('replay', '')).replace('_', ' ')}"
                + (" on the checkpoint" if on_checkpoint else "")
                + f", positions {', '.join(str(x) for x in d.get('probe_positions') or [])}): {said}")
    else:
        line = f"{a['kind']} at step {a['step']}" + (f": {d['error']}" if d.get("error") else "")
    if isinstance(a.get("cause"), dict):
        line += "; " + cause_words(a["cause"])
    return line


def value_text(value: Any) -> str:
    """A guard setting as the reports print it: an LR with 3 digits, one value per param group (once when all are equal)."""
    if isinstance(value, (list, tuple)):  # one value per param group
        if len(value) > 1 and all(v == value[0] for v in value):  # the same in every group: said once
            return f"{value_text(value[0])} (every param group)"
        return ", ".join(value_text(v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt(float(value)) if abs(value) < 1e-2 else table_number(float(value))  # an LR keeps 3 digits
    return str(value)
