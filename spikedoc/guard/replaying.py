"""Replay steps inside the guard's iteration: `replay.py`'s tests handed to the loop, judged, recorded."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spikedoc.guard import cause
from spikedoc.guard.judge import Decision, Judge
from spikedoc.guard.payload import json_plain
from spikedoc.guard.policy import Policy
from spikedoc.guard.replay import CauseTests, schedule_confirmed
from spikedoc.guard.restore import TrainingState
from spikedoc.guard.stepping import StepJudgement
from spikedoc.guard.steps import PendingStep
from spikedoc.monitor import Monitor

__all__ = ["ReplaySteps"]

log = logging.getLogger(__name__)

#: A rollback target: the good checkpoint and its state.
Target = tuple[Any, dict[str, Any]]


class ReplaySteps:
    """Begins and finishes the replay steps `CauseTests` calls for; the guard acts on what they find.

    A replay step is a step of the loop like any other (its forwards and `optimizer.step()`), handed
    the batches of the replay, judged inside the step and never applied (`StepJudgement.on_step`),
    recorded by the monitor as skipped at those batches' stream position, and as a `replay` event
    (and a `replay` entry in the guard's actions) with its finding.
    """

    def __init__(self, tests: CauseTests, state: TrainingState, steps: StepJudgement, judge: Judge, policy: Policy, *,
                 monitor: Callable[[], Monitor], skip: Callable[..., None], rollback: Callable[..., None],
                 target: Callable[[Decision], Target]) -> None:  # fmt: skip
        self.tests, self.state, self.steps, self.judge, self.policy = tests, state, steps, judge, policy
        self._monitor = monitor
        self._skip = skip
        """The guard's `_skip_stretch(decision, last_vetoed=...)`: skip a corrupt stretch without rolling back."""
        self._rollback = rollback
        """The guard's `_rollback(decision, target, data=...)`."""
        self._target = target
        """The guard's `_target(decision)`: the rollback's good checkpoint (or a stop when none or the budget is spent)."""

    def roll_back(self, decision: Decision) -> None:
        """Roll back for `decision`, after replaying its suspect batches on the target checkpoint where
        they are held. A collapse (measured), a request, or a fault that came back from a good state
        (confirmed by that) is not tested again."""
        if decision.cause == "optimizer_state" or decision.reason == "requested" or cause.recurring(decision, self.policy):
            self._rollback(decision)
            return
        found = self._target(decision)
        if not self.tests.from_checkpoint(decision, found):
            data = self.tests.data_at_fault()
            self.tests.clear()
            self._rollback(decision, found, data=data)

    def begin(self, step: int, *, drawing: bool) -> tuple[PendingStep | None, bool]:
        """The replay step to hand out at step index `step` (None: none waits), and whether the test
        had to be dropped: a loop drawing its own batches (`drawing`) holds batches of another shape
        than the replay's (`Draws.put_first`). A replay on the rollback's checkpoint puts its state
        back first (the rollback proper puts it back again after, so the replay leaves no trace)."""
        monitor = self._monitor()
        probe = self.tests.next_step(step, monitor.sample_offset)
        if probe is None or probe.replay is None:
            return None, False
        if probe.replay.on == "checkpoint" and self.tests.target is not None and not self.tests.target_loaded:
            self.state.load(self.tests.target[1])
            self.tests.target_loaded = True
            self.steps.moments.reset()  # another state: its first step is the baseline
        if drawing and not self.state.draws.put_first(list(zip(probe.positions, probe.batches)), self.state.device):
            return None, True
        monitor.skip_samples(probe.replay.sample_offset - monitor.sample_offset)
        return probe, False

    def finish(self, p: PendingStep) -> None:
        """Judge and record replay step `p`, then hand out the next replay or act on the test's
        conclusion (the decision's `cause_test`): skip the data, go on after a transient fault, or
        roll back (`CauseTests.after`). The guard's step index is already past `p`."""
        if p.verdict is None:  # its optimizer step never ran (a GradScaler skipped it): the loss alone
            self.steps.judge_unstepped(p, as_veto=False)
        monitor = self._monitor()
        monitor.skip_samples(p.sample_offset - monitor.sample_offset)
        decision = p.probe
        assert decision is not None and p.verdict is not None
        finding = self.tests.judge(p, self.judge.loss_detector)
        self.policy.actions.append({"kind": "replay", "step": p.step, **finding})
        monitor.event("replay", at_step=p.step, **json_plain({**finding, "onset_step": decision.onset_step}))
        then = self.tests.after(finding)
        if then == "wait":
            return
        decision.evidence["cause_test"] = conclusion = self.tests.conclusion()
        if then == "rollback":  # the state: its suspect batches are replayed on the checkpoint first
            self.roll_back(decision)
            return
        began = self.tests.began_at if self.tests.began_at is not None else p.step
        last_vetoed, target, data = began - 1, self.tests.target, self.tests.data_at_fault()
        self.tests.clear()
        if then == "skip":
            self.tests.sound = conclusion
            self._skip(decision, last_vetoed=last_vetoed)
        elif then == "go_on":  # the vetoed steps were never applied: nothing else to undo
            self.tests.transient = conclusion
            self.judge.forget_vetoes()
            log.warning("spikedoc guard: steps %d-%d vetoed, and the first one's batches replayed in band on the same "
                        "state: a transient fault, not the data", decision.onset_step, last_vetoed)  # fmt: skip
        else:  # `roll_back_tested`: the replays on the checkpoint ended, the rollback acts on their finding
            self._rollback(decision, target, data=data)

    def confirm_schedule(self, step: int) -> None:
        """At step index `step`: once the replay with the LR held before a jump has passed the step
        its rollback came from, the schedule is confirmed (`lr_confirmed` on the rollback, a `replay` event)."""
        finding = schedule_confirmed(self.policy, step)
        rollback = self.policy.last_rollback()
        if finding is None or rollback is None:
            return
        rollback["lr_confirmed"] = finding
        self.policy.actions.append({"kind": "replay", "step": step - 1, **finding})
        self._monitor().event("replay", at_step=step - 1, **json_plain(finding))
