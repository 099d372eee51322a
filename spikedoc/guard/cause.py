"""When vetoes are a corrupt stretch to test, and when the guard must stop: decisions as data.

The replays that tell the data from the state are `replay.py`'s; each replay's result is recorded
(`cause_test` in the action's evidence) so that `analyze` shows the cause as confirmed by a replay
rather than inferred.
"""

from __future__ import annotations

from typing import Any

from spikedoc.guard.judge import Decision
from spikedoc.guard.policy import Policy
from spikedoc.guard.steps import SeenStep

__all__ = ["corrupt_stretch", "stop_for", "last_probe", "recurring", "rollback_to_revert", "remedy_undone"]


def corrupt_stretch(decision: Decision, vetoed: list[SeenStep]) -> bool:
    """Vetoes piling up, each for its loss before its update: no update was applied since the last
    healthy step, so the state is the one that step left, and either it or the batches are at fault
    (replay steps tell which). Vetoes for the gradient alone, with an ordinary loss, say nothing
    about the data, and an incident that applied steps is the trajectory's: those roll back."""
    return decision.reason == "vetoes" and bool(vetoed) and all(seen.bad_loss for seen in vetoed)


def stop_for(decision: Decision, policy: Policy, *, max_rollbacks: int) -> tuple[str, str] | None:
    """(reason, message) when the rollback `decision` calls for must not be made: the budget is
    spent, and `recurring` when the replay from the last good checkpoint met the fault again before
    passing the step it had rolled back from (the fault returns from a good state). A collapse of
    the optimizer's second moments that returns so stops at once: the good state had sound moments,
    so the loop itself overwrites them at that step, and every rollback would meet it again."""
    previous = policy.last_rollback()
    if decision.cause == "optimizer_state" and previous is not None and previous["cause"] == "optimizer_state" \
            and recurring(decision, policy):  # fmt: skip
        return "recurring", (f"the optimizer's second moments collapsed again at step {decision.onset_step} after the "
                             f"rollback to the good checkpoint of step {previous['to_step']}{_collapse(decision)}: the "
                             "loop overwrites the optimizer state when it reaches that step (not the data, not the "
                             "schedule), and one more rollback would meet it again")  # fmt: skip
    if policy.rollbacks < max_rollbacks:
        return None
    if recurring(decision, policy):
        reset = ", optimizer moments reset" if policy.moments_reset() else ""
        # Only a probe that found the state broken (other batches out of band too) clears the data.
        test = last_probe(decision, policy)
        where = (f"the probe at step {test['probe_step']} found the state broken: it is in the state or the loop, "
                 "not in the data" if test is not None and test["found"] == "state"
                 else "no probe step told the data from the state")  # fmt: skip
        return "recurring", (f"the fault came back after the last of {policy.rollbacks} rollbacks to a good checkpoint "
                             f"(LR at {policy.lr_scale:.3g}x{reset}); {where}, and one more rollback will not fix it")  # fmt: skip
    return "budget", f"rollback budget spent ({policy.rollbacks} of max_rollbacks={max_rollbacks})"


def _collapse(decision: Decision) -> str:
    """`" (12 of 12 tensors, e.g. h.0.fc.weight.exp_avg_sq, at 0 times their norm before)"`, from the decision's evidence."""
    found = decision.evidence.get("optimizer_state") or {}
    if not found.get("collapsed"):
        return ""
    first = f", e.g. {found['tensors'][0]}" if found.get("tensors") else ""
    return f" ({found['collapsed']} of {found['of']} tensors{first}, at {found['ratio_min']:.3g} times their norm before)"


def last_probe(decision: Decision, policy: Policy) -> dict[str, Any] | None:
    """The latest probe's finding (`cause_test`): this decision's, else the last rollback's that had one."""
    tests = [decision.evidence.get("cause_test")]
    tests += [(rollback.get("evidence") or {}).get("cause_test") for rollback in reversed(policy.rollback_actions())]
    return next((test for test in tests if isinstance(test, dict) and test.get("found") in ("data", "state")), None)


def recurring(decision: Decision, policy: Policy) -> bool:
    """The replay after the last rollback met trouble again before passing the step it had rolled back from."""
    previous = policy.last_rollback()
    return previous is not None and decision.onset_step <= previous["from_step"]


def rollback_to_revert(policy: Policy, *, continues: bool) -> dict[str, Any] | None:
    """The rollback whose LR and clipping change a corrupt stretch undoes: the last one, when the
    stretch `continues` the batches it skipped (`Rollbacks._continues_rollback`) and it was made on
    the hypothesis that the state was at fault when the data turned out to be (not an LR hold, not
    undone already)."""
    rollback = policy.last_rollback()
    if (not continues or rollback is None or rollback["reason"] != "vetoes" or rollback.get("lr_held")
            or rollback.get("reverted")):  # fmt: skip
        return None
    return rollback


def remedy_undone(rollback: dict[str, Any]) -> tuple[float, float | None]:
    """The LR scale and the guard's clip from before `rollback`'s remedy. A rollback that tightened
    the loop's own clip (`clip_of_loop`) gives clipping back to the loop: the guard's clip is None,
    not the loop's norm a second time.

    Example:
        >>> remedy_undone({"lr_scale_before": 1.0, "clip_before": 1.0, "clip_of_loop": True})
        (1.0, None)
    """
    return float(rollback["lr_scale_before"]), None if rollback.get("clip_of_loop") else rollback["clip_before"]
