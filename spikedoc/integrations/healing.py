"""The guard inside a framework's own loop: judge each step before its update, veto it, checkpoint, roll back in process.

`StepHealer` is what `spikedoc.Guard` does between a loop's backward and its update, for loops a
framework owns (HF `Trainer`, Lightning): the same `Judge` (band, veto rule, incident tracking,
damage verdict), the same `CheckpointStore` (host copies, checked finite and loadable, the newest
good one kept in memory) and the same `plan_remedy` (LR factor or LR hold, tighter clipping). What
differs is who owns the loop: the framework's loader, step counter, clipping and scheduler. So a
veto drops the step's gradients (the optimizer then skips every parameter), a rollback restores
the model, optimizer, scheduler and GradScaler and hands the framework its step counter and
clipping norm back (`Restored`), and the data past the fault is skipped by letting the
framework's loader move on rather than replaying it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.errors import GuardStopped
from spikedoc.guard.agree import agree, world
from spikedoc.guard.checkpoint import Checkpoint, CheckpointError, CheckpointStore, host_copy
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Decision, Judge, Verdict
from spikedoc.guard.payload import buffer_patterns, json_plain
from spikedoc.guard.remedy import plan_remedy
from spikedoc.guard.rng import rng_state
from spikedoc.guard.schedule import apply_lrs, group_lrs, scale_schedule
from spikedoc.monitor.meta import describe_scheduler

__all__ = ["Restored", "StepHealer"]

log = logging.getLogger("spikedoc.integrations")


@dataclass(frozen=True)
class Restored:
    """What the framework must be told after a rollback."""

    step: int
    """Its optimizer-step counter goes back to this (the checkpoint's step), so the schedule is right."""
    clip: float | None
    """Its gradient-norm clipping from now on (tightened by the rollback, or kept)."""


class StepHealer:
    """Veto, checkpoint and in-process rollback for a framework callback (used by the `heal=` option).

    The callback calls `start` when training begins, `add_loss` with each micro-batch's loss,
    `before_update` once the step's gradients are final (before the optimizer applies them),
    `end_step` after the framework finished the step (its counter advanced), and `close` at the end.
    Records the events `veto`, `checkpoint` (with `guard: true`), `rollback`, `data_skip` and
    `guard_stop` as `spikedoc.Guard` does, so `spikedoc analyze` reports them.

    Example:
        >>> healer = StepHealer(GuardConfig(checkpoint_every=50))  # doctest: +SKIP
        >>> healer.start(run, model, optimizer, scheduler=sched, scaler=None, clip=1.0, step=0)  # doctest: +SKIP
    """

    def __init__(self, config: GuardConfig) -> None:
        if config.reset_moments:
            raise ValueError("heal=GuardConfig(reset_moments=True) is not supported in a framework callback; "
                             "use spikedoc.Guard for it")  # fmt: skip
        self.config = config
        self.judge = Judge(config)
        self.clip: float | None = None
        """The clipping norm in use (the framework's own setting, tightened by rollbacks)."""
        self.lr_scale = 1.0
        """Product of the LR factors of all rollbacks: the schedule in use is the original times this."""
        self.hold: dict[str, Any] | None = None
        self.rollbacks = self.vetoes = self.data_skips = 0
        self.actions: list[dict[str, Any]] = []
        """What was done, in order: one dict per veto, rollback, data skip and stop (as in the events)."""
        self.run: Any = None
        self._losses: list[Tensor] = []
        self._loss_shares = False
        self._verdict: Verdict | None = None
        self._lrs: list[float] | None = None
        self._restore_lrs: list[Any] | None = None
        self._veto_now = False
        self._bad_in_row: list[int] = []
        """Steps vetoed for their loss since the last applied step (the batch looked bad before any update)."""
        self._applied_since_remedy = True
        self._hooks: list[Any] = []
        self._closed = False

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, run: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any, scaler: Any,
              clip: float | None, step: int) -> None:  # fmt: skip
        """Attach to a started `WatchedRun` and take the first checkpoint (of `step`)."""
        self.run, self.model, self.optimizer, self.scheduler, self.scaler = run, model, optimizer, scheduler, scaler
        self.clip = clip
        rank = world()
        self.store = CheckpointStore(run.run_dir / "checkpoints", keep=self.config.keep, rank=rank[0] if rank else None,
                                     in_memory=self.config.keep_in_memory,
                                     background=self.config.write_in_background and rank is None,
                                     buffers=buffer_patterns(model))  # fmt: skip
        self._attach(step)
        self._checkpoint(step)

    def _attach(self, step: int) -> None:
        # After the monitor's own step hooks (a segment reopened registers them anew), so that its
        # statistics see the step's gradients before a veto drops them.
        for hook in self._hooks:
            hook.remove()
        self._hooks = [self.optimizer.register_step_pre_hook(self._drop_if_vetoed),
                       self.optimizer.register_step_post_hook(self._restore_lr)]  # fmt: skip
        self.run.monitor.leave_spike_detection_to_caller()  # the judge flags spikes (`densify`)
        self.judge.schedule = {"start_step": step, "scheduler": describe_scheduler(self.scheduler)}

    @property
    def monitor(self) -> Any:
        return self.run.monitor

    def close(self) -> None:
        """Finish the checkpoint write under way and remove the step hooks. Idempotent."""
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.run is not None:
            self.store.close()
            self._report_written()

    # -------------------------------------------------------------------------------- per step

    def add_loss(self, loss: Tensor, *, share: bool = False) -> None:
        """One micro-batch's loss; `share`: a share of the step's loss (the step's is their sum), else their mean."""
        if self._closed:  # a forward after the run ended (or stopped): no step of this run's
            return
        self._losses.append(loss.detach().float().reshape(()))
        self._loss_shares = self._loss_shares or share

    def before_update(self, step: int) -> bool:
        """Judge step `step` (its gradients final, its update not applied yet); True when it is vetoed.

        A vetoed step's gradients are dropped in the optimizer's step pre-hook (or at once with
        `drop_now`), so the optimizer leaves every parameter and its state as they were.
        """
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            stacked = torch.stack([x.to(losses[0].device) for x in losses])
            loss = stacked.sum() if self._loss_shares else stacked.mean()
        grad_norm = self.monitor.grad_norm() if self.monitor is not None else None
        values = agree(loss, grad_norm if grad_norm is not None else torch.zeros(()), rollback_request=False)
        verdict = self._verdict = self.judge.judge(step, values)
        if verdict.veto or verdict.loss_flagged or verdict.grad_flagged:
            self.monitor.densify(step + 1)  # the steps after a flag get the full statistics
        caps = self.hold["caps"] if self.hold is not None and step >= self.hold["from_step"] else None
        self._restore_lrs = apply_lrs(self.optimizer, 1.0, caps)  # the LR held below its caps for this update
        self._lrs = group_lrs(self.optimizer)
        self._veto_now = verdict.veto
        if verdict.veto:
            self._record_veto(verdict)
        return verdict.veto

    def drop_now(self) -> None:
        """Drop a vetoed step's gradients now (a framework whose last hook before the update runs
        inside `optimizer.step`, after its pre-hooks: Lightning's `on_before_optimizer_step`)."""
        if self._veto_now:
            _drop_gradients(self.optimizer)

    def end_step(self, next_step: int) -> Restored | None:
        """The framework finished the judged step (its counter is at `next_step`): learn, checkpoint,
        or roll back. Returns what the framework must set after a rollback, else None.

        Raises:
            GuardStopped: the rollback budget is spent, or no good checkpoint precedes the damage.
        """
        verdict, self._verdict = self._verdict, None
        if verdict is None:
            return None
        self._report_written()
        if verdict.veto and ("loss_out_of_band" in verdict.reasons or not math.isfinite(verdict.loss)):
            self._bad_in_row.append(verdict.step)
        elif not verdict.veto:
            self._bad_in_row, self._applied_since_remedy = [], True
        decision = self.judge.record(verdict, lrs=self._lrs)
        if decision is not None and self._corrupt_stretch(decision):
            self._skip_stretch(decision, next_step)
        elif decision is not None:
            return self._rollback(decision, next_step)
        elif next_step % self.config.checkpoint_every == 0:
            self._checkpoint(next_step)
        return None

    # ---------------------------------------------------------------------------- step hooks

    def _drop_if_vetoed(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._veto_now:
            _drop_gradients(optimizer)

    def _restore_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # The schedule's own value again right after the update: only the applied LR is held.
        self._veto_now = False
        restore, self._restore_lrs = self._restore_lrs, None
        if restore is not None:
            for group, lr in zip(optimizer.param_groups, restore):
                group["lr"] = lr

    def _record_veto(self, verdict: Verdict) -> None:
        self.vetoes += 1
        detail = verdict.evidence()
        self.actions.append({"kind": "veto", "step": verdict.step, **detail})
        self.monitor.event("veto", at_step=verdict.step, **json_plain(detail))

    # ------------------------------------------------------------------------------ checkpoints

    def _checkpoint(self, step: int) -> None:
        healthy = self.judge.incident is None and self.judge.vetoes_in_row == 0
        try:
            state = host_copy({
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            })
            # The framework owns the data: its loader moves on after a rollback, so there is no
            # position to restore; the generators are kept for the record, not restored.
            state.update(data={}, rng=rng_state(), guard=self._policy_state(step))
            self.store.save(step, state, healthy=healthy)
        except Exception as exc:  # noqa: BLE001 - the guard's own failure never stops training
            self._checkpoint_failed(step, exc)

    def _policy_state(self, step: int) -> dict[str, Any]:
        return {"step": step, "clip": self.clip, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks,
                "vetoes": self.vetoes, "hold": self.hold, "judge": self.judge.state_dict()}  # fmt: skip

    def _report_written(self) -> None:
        for checkpoint, error in self.store.landed():
            if error is None:
                self.monitor.event("checkpoint", at_step=checkpoint.step, path=str(checkpoint.path),
                                   healthy=checkpoint.healthy, guard=True)  # fmt: skip
            else:
                self._checkpoint_failed(checkpoint.step, error)

    def _checkpoint_failed(self, step: int, error: BaseException) -> None:
        warnings.warn(f"spikedoc guard: checkpoint of step {step} failed ({error}); training continues", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
        self.monitor.event("checkpoint_failed", at_step=step, error=str(error), guard=True)

    # -------------------------------------------------------------------------------- remedies

    def _corrupt_stretch(self, decision: Decision) -> bool:
        """Vetoes for their loss piling up right after a rollback or a skip, with no step applied
        since: a good state met the batches the loader handed out next and they look bad before any
        update, so the data is at fault, not the weights."""
        return (decision.reason == "vetoes" and not self._applied_since_remedy
                and len(self._bad_in_row) >= self.config.max_vetoes_in_row)  # fmt: skip

    def _skip_stretch(self, decision: Decision, next_step: int) -> None:
        steps = list(self._bad_in_row)
        self.data_skips += len(steps)
        if self.data_skips > self.config.max_data_skips:
            self._stop("data", f"{self.data_skips} batches of a corrupt stretch of data skipped, more than "
                       f"max_data_skips={self.config.max_data_skips}", decision, next_step)  # fmt: skip
        self.judge.forget_vetoes()
        self._bad_in_row = []
        detail = {"steps": [steps[0], steps[-1]], "positions": [], "data_skips": self.data_skips,
                  "skipped_by": "loader_moves_on", "remedy_reverted": self._revert_remedy(), **decision.evidence}  # fmt: skip
        self.actions.append({"kind": "data_skip", **detail})
        self.monitor.event("data_skip", **json_plain(detail))
        log.warning("spikedoc guard: steps %d-%d vetoed on a corrupt stretch of data; skipped without rolling back",
                    steps[0], steps[-1])  # fmt: skip

    def _revert_remedy(self) -> bool:
        """Undo the LR and clipping change of the rollback this stretch follows: it was made on the
        hypothesis that the state was at fault, and the data turned out to be."""
        rollback = next((a for a in reversed(self.actions) if a["kind"] in ("rollback", "data_skip")), None)
        if rollback is None or rollback["kind"] != "rollback" or rollback["reason"] != "vetoes" or rollback.get("lr_held"):
            return False
        scale_schedule(self.optimizer, self.scheduler, float(rollback["lr_scale_before"]) / self.lr_scale)
        self.lr_scale, self.clip = float(rollback["lr_scale_before"]), rollback["clip_before"]
        return True

    def _rollback(self, decision: Decision, from_step: int) -> Restored:
        previous = next((a for a in reversed(self.actions) if a["kind"] == "rollback"), None)
        # The fault came back before the run passed the step it had rolled back from: it returns
        # from a good state, with the remedies so far.
        recurring = previous is not None and decision.onset_step <= previous["from_step"]
        if self.rollbacks >= self.config.max_rollbacks:
            reason = "recurring" if recurring else "budget"
            self._stop(reason, f"rollback budget spent ({self.rollbacks} of max_rollbacks={self.config.max_rollbacks})"
                       + (": the fault came back after the last rollback to a good checkpoint" if recurring else ""),
                       decision, from_step)  # fmt: skip
        target, state = self._target(decision.precursor_step)
        if target is None:
            self._stop("no_checkpoint", f"no good checkpoint at or before step {decision.precursor_step}, the incident's "
                       "earliest precursor", decision, from_step)  # fmt: skip
        saved_scale = float(state["guard"]["lr_scale"])
        self._restore(state)
        remedy = plan_remedy(decision, config=self.config, clip=self.clip, lr_scale=self.lr_scale, hold=self.hold,
                             batches={}, clipped=self.judge.clipped_share(self.clip))  # fmt: skip
        evidence = remedy.evidence(clip_before=self.clip, jump=decision.lr_jump)
        evidence["lr_scale_before"] = self.lr_scale
        self.clip, self.lr_scale, self.hold = remedy.clip, remedy.lr_scale, remedy.hold
        scale_schedule(self.optimizer, self.scheduler, self.lr_scale / saved_scale)  # the framework's own schedule
        if recurring:  # escalate: beyond the LR cut, every moment starts afresh (Adam's bias correction)
            self.optimizer.state.clear()
            evidence["recurring"] = evidence["moments_reset"] = True
        self.rollbacks += 1
        self._applied_since_remedy, self._bad_in_row = False, []
        self.store.forget_after(target.step)
        self.run.reopen(target.step, scheduler=self.scheduler)  # a new segment, numbered from the checkpoint
        self._attach(target.step)
        detail = {"from_step": from_step, "to_step": target.step, "checkpoint": str(target.path), "reason": decision.reason,
                  "cause": decision.cause, "onset_step": decision.onset_step, "precursor_step": decision.precursor_step,
                  "rollbacks": self.rollbacks, "skipped_by": "loader_moves_on", **evidence,
                  "evidence": decision.evidence}  # fmt: skip
        self.actions.append({"kind": "rollback", **detail})
        self.monitor.event("rollback", **json_plain(detail))
        log.warning("spikedoc guard: rolled back in process from step %d to %d (%s)", from_step, target.step,
                    decision.reason)  # fmt: skip
        return Restored(step=target.step, clip=self.clip)

    def _target(self, before: int) -> tuple[Checkpoint | None, dict[str, Any] | None]:
        """The newest readable good checkpoint at or before `before`, with its state."""
        while True:
            target = self.store.rollback_target(before)
            if target is None:
                return None, None
            try:
                return target, self.store.load(target)
            except CheckpointError as exc:
                warnings.warn(f"spikedoc guard: {exc}; trying an older checkpoint", RuntimeWarning, stacklevel=4)
                self.monitor.event("checkpoint_refused", path=str(target.path), error=str(exc))
                before = target.step - 1

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.judge.load_state_dict(state["guard"]["judge"])

    def _stop(self, reason: str, message: str, decision: Decision, step: int) -> None:
        diagnosis = {"reason": reason, "step": step, "rollbacks": self.rollbacks, "decision": asdict(decision),
                     "actions": [a for a in self.actions if a["kind"] == "rollback"]}  # fmt: skip
        self.actions.append({"kind": "guard_stop", "reason": reason, "step": step})
        self.monitor.event("guard_stop", **json_plain({k: v for k, v in diagnosis.items() if k != "step"}))
        self.close()
        self.run.finish()
        raise GuardStopped(f"spikedoc guard stopped the run at step {step}: {message} (incident: {decision.reason}, "
                           f"onset step {decision.onset_step}); see the guard_stop event in {self.run.run_dir}", diagnosis)


def _drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Every parameter's gradient gone: torch optimizers skip a parameter without one, so the step
    leaves the weights, the moments and the step counts as they were (a GradScaler has already
    checked the gradients for inf by the time its optimizer's step runs)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
