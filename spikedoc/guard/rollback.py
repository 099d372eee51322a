"""A rollback's mechanics: find the newest good checkpoint, put its state back, apply the remedy."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spikedoc.guard.cause import remedy_undone, rollback_to_revert
from spikedoc.guard.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Decision, Judge
from spikedoc.guard.policy import Policy
from spikedoc.guard.remedy import plan_remedy, reset_implicated
from spikedoc.guard.restore import TrainingState
from spikedoc.guard.steps import RecentSteps

__all__ = ["Rollbacks"]


@dataclass
class Rollbacks:
    """Returns training to a good checkpoint and changes the policy for the replay (`plan_remedy`).

    The guard decides when (its judgement) and records what happened (the `rollback` event this
    returns the detail of); this finds the target, restores the state, and applies the remedy.
    """

    config: GuardConfig
    store: CheckpointStore
    state: TrainingState
    judge: Judge
    policy: Policy
    recent: RecentSteps

    def target(self, before: int, refused: Callable[[Checkpoint, CheckpointError], None]) -> tuple[Checkpoint, dict[str, Any]] | None:
        """The newest readable good checkpoint at or before step `before`, with its state; `refused`
        hears of each unreadable one passed over."""
        while True:
            target = self.store.rollback_target(before)
            if target is None:
                return None
            try:
                return target, self.store.load(target)
            except CheckpointError as exc:
                warnings.warn(f"spikedoc guard: {exc}; trying an older checkpoint", RuntimeWarning, stacklevel=5)
                refused(target, exc)
                before = target.step - 1

    def remedy(self, decision: Decision, saved_lr_scale: float, *, recurring: bool, data: bool | None = None,
               loop_clip: float | None = None) -> dict[str, Any]:
        """After the state is back: the new clip, LR scale or hold, skipped batches and (with
        `reset_moments`, or for a `recurring` fault) optimizer state dropped; the evidence for the
        event. `data`: what a same-batch replay showed of the suspect batches (`plan_remedy`).
        `loop_clip`: the loop's own clipping norm, the clip in use when the guard clips nothing itself."""
        policy = self.policy
        clip = policy.clip if policy.clip is not None else loop_clip
        remedy = plan_remedy(decision, config=self.config, clip=clip, lr_scale=policy.lr_scale, hold=policy.hold,
                             batches=self.recent.batches(), clipped=self.judge.clipped_share(clip), data=data)  # fmt: skip
        evidence = {**remedy.evidence(clip_before=clip, jump=decision.lr_jump), "lr_scale_before": policy.lr_scale}
        if policy.clip is None and loop_clip is not None:
            evidence["clip_of_loop"] = True  # tightened below the loop's own clip, which stays
        # The loop's own clip kept as it is: the guard adds no second clip at the same norm on every step.
        kept_loops = policy.clip is None and remedy.clip == loop_clip
        policy.clip = None if kept_loops else remedy.clip
        policy.lr_scale, policy.hold = remedy.lr_scale, remedy.hold
        self.state.stream.skip_positions(remedy.skip_positions)
        self.state.scale_schedule(policy.lr_scale / saved_lr_scale)
        evidence["reset_optimizer_state_for"] = reset_implicated(
            self.state.model, self.state.optimizer, decision, self.recent.grad_norms()) if self.config.reset_moments else []  # fmt: skip
        if recurring:  # escalate: beyond the LR cut, every moment starts afresh (Adam's bias correction)
            self.state.optimizer.state.clear()
            evidence["recurring"] = evidence["moments_reset"] = True
        if self.state.stream.kind in ("callable", "iterator") and remedy.skip_positions:
            evidence["skipped_by"] = "fresh_draws"  # a function or iterator has no batch to leave out: others are drawn
        policy.rollbacks += 1
        return evidence

    def skip_stretch(self, decision: Decision, positions: list[int], *, last_vetoed: int) -> dict[str, Any]:
        """Skip the batches of a corrupt stretch without rolling back (the data was shown at fault):
        its vetoes are forgotten, and the LR and clipping change of the rollback whose skipped batches
        it continues (`_continues_rollback`) is undone (`rollback_to_revert`). Returns the `data_skip` event's detail."""
        self.policy.data_skips += len(positions)
        replayed = self._continues_rollback(positions[0])
        self.state.stream.skip_positions(positions)
        self.judge.forget_vetoes()
        rollback = rollback_to_revert(self.policy, continues=replayed)
        if rollback is not None:
            before, clip = remedy_undone(rollback)
            self.state.scale_schedule(before / self.policy.lr_scale)
            self.policy.lr_scale, self.policy.clip = before, clip
            rollback["reverted"] = True
        return {"steps": [decision.onset_step, last_vetoed], "positions": positions, "data_skips": self.policy.data_skips,
                "remedy_reverted": rollback is not None, "after_rollback": replayed, **decision.evidence}  # fmt: skip

    def _continues_rollback(self, first: int) -> bool:
        """The batches from data position `first` follow, through skipped ones only, those the last
        rollback skipped: the replay of a good state met them (cause_status's `same_batches`)."""
        rollback = self.policy.last_rollback()
        blamed = set(rollback.get("skipped_positions") or []) if rollback is not None else set()
        position = first - 1
        while position in self.state.stream.skip and position not in blamed:
            position -= 1
        return position in blamed
