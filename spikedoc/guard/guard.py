"""Guard: a training loop that vetoes bad steps, checkpoints, and rolls back damage by itself."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spikedoc.analysis.recovery import RecoveryConfig
from spikedoc.detector.streaming import DetectorConfig
from spikedoc.errors import GuardStopped
from spikedoc.guard import cause
from spikedoc.guard.agree import rank_zero_last, world
from spikedoc.guard.checkpoint import Checkpoint
from spikedoc.guard.checkpointing import Checkpointer
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.data import DataStream
from spikedoc.guard.draws import Draws
from spikedoc.guard.feed import Feed
from spikedoc.guard.gate import StepGate, unwrapped
from spikedoc.guard.job import job_fingerprint
from spikedoc.guard.judge import Decision, Judge
from spikedoc.guard.payload import buffer_patterns, json_plain
from spikedoc.guard.policy import Policy
from spikedoc.guard.replay import CauseTests
from spikedoc.guard.replaying import ReplaySteps
from spikedoc.guard.restore import TrainingState
from spikedoc.guard.resume import resume_point
from spikedoc.guard.rollback import Rollbacks
from spikedoc.guard.sharded import GlobalNorm, checkpoint_store, is_fsdp
from spikedoc.guard.stepping import StepJudgement
from spikedoc.guard.steps import RecentSteps
from spikedoc.monitor import Monitor, watch
from spikedoc.monitor.meta import describe_scheduler

__all__ = ["Guard"]

log = logging.getLogger(__name__)


class Guard:
    """Iterate training batches under a guard: bad steps vetoed, damage rolled back, every action recorded.

    Yields `(step, batch)`; a loop that draws its own batches uses `guard.draw` and iterates
    `guard.steps()` instead (nanoGPT's shape: `hooks/guarded_nanogpt.py`). Includes `spikedoc.watch` (same run directory and recording) and owns
    global-norm clipping (`clip=`, the monitor's). Inside each `optimizer.step()`, in a step pre-hook
    (`StepGate`: the step method is never replaced, so schedulers, GradScaler and Accelerate compose),
    it judges the step's loss and gradient norm (one host sync per step, plus one all_reduce under
    torch.distributed); a step with a non-finite value or one far out of the band is not applied. Between steps it
    checkpoints every `checkpoint_every` steps and, when the damage judgement says the run did not
    recover, rolls back to the newest good checkpoint before the incident with the LR schedule
    scaled by `lr_factor` and clipping tightened; before it acts on vetoes that pile up or rolls
    back, replay steps test the cause (`replay.py`: the suspect batches again on a good state, the
    last healthy ones on the vetoed state), and only batches shown at fault are skipped; the
    optimizer's second moments collapsing (`moments.py`) veto the step and roll back at once.
    Records the events `veto`, `checkpoint`, `rollback`, `data_skip`, `replay` (a replay's finding),
    `checkpoint_failed`, `guard_resume` and `guard_stop`.

    Args:
        model: The module trained.
        optimizer: Its optimizer (an Accelerate `AcceleratedOptimizer`: the one inside).
        scheduler: The LR scheduler, saved in checkpoints and scaled on rollback; None: the LR the
            loop sets (by hand, or by a scheduler built after the guard) is scaled inside each step.
        data: The batches: a DataLoader, a torchdata StatefulDataLoader, any re-iterable, an
            iterator, or a function returning a batch (`get_batch`, drawn through `guard.draw`).
        run_dir: The run directory (monitor recording, `checkpoints/`); None picks `runs/<time>`.
        scaler: A `torch.amp.GradScaler`, saved in checkpoints and recorded by the monitor.
        detector: Band settings (`DetectorConfig`); None for the analysis's defaults.
        recovery: Damage judgement settings (`RecoveryConfig`); None for the defaults.
        watch_options: Further `spikedoc.watch` keywords (`every`, `layer_every`, `flush_every`, ...).
        **options: `GuardConfig` fields: `checkpoint_every`, `keep`, `clip`, `veto_sigma`,
            `max_rollbacks`, `lr_factor`, `skip_window`, `max_steps`, `epochs`, `resume`, ...

    Raises:
        GuardStopped: from the iteration, when the rollback budget is spent (reason `recurring`
            for a fault that returned from good checkpoints) or no good checkpoint precedes the damage.
        ValueError: when `run_dir` holds checkpoints of another job and `resume` is None.

    Example:
        >>> guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader, run_dir="runs/x")  # doctest: +SKIP
        >>> for step, batch in guard:  # doctest: +SKIP
        ...     model(**batch).loss.backward(); opt.step(); sched.step(); opt.zero_grad()
        >>> guard.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        data: Any,
        scheduler: Any = None,
        run_dir: str | Path | None = None,
        scaler: Any = None,
        detector: DetectorConfig | None = None,
        recovery: RecoveryConfig | None = None,
        watch_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        try:
            self.config = GuardConfig(**options)
        except TypeError as exc:
            raise ValueError(f"Guard: {exc}; the options are the fields of GuardConfig") from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Guard: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        optimizer, scheduler = unwrapped(optimizer, scheduler)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
        self._watch_options = {k: v for k, v in (watch_options or {}).items() if k not in ("clip", "scaler", "start_step", "start_sample", "scheduler")}
        rank = world()
        # Under torch.distributed every rank must know that every other rank's file landed before it
        # counts (`agree_all`), so the files are written in the foreground there.
        # Under FSDP2 the norm judged is the full gradient's (`GlobalNorm`), clipped by the guard itself,
        # and checkpoints are each rank's shards (DCP on disk): `sharded.py`.
        self._global_norm = GlobalNorm(rank=rank[0]) if is_fsdp(model) else None
        self._store = checkpoint_store(model, self.run_dir / "checkpoints", keep=self.config.keep,
                                       rank=rank[0] if rank else None, in_memory=self.config.keep_in_memory,
                                       background=self.config.write_in_background and rank is None,
                                       buffers=buffer_patterns(model))  # fmt: skip
        self._stream = DataStream(data, seed=self.config.seed, epochs=self.config.epochs)
        self._draws = Draws()
        self._state = TrainingState(model, optimizer, scheduler, scaler, self._stream, self._draws)
        self._judge = Judge(self.config, detector=detector, recovery=recovery)
        self.policy = Policy(clip=self.config.clip)
        """Clipping, LR scale and hold, budgets used and actions taken (`clip`, `lr_scale`, ... read it)."""
        self._recent = RecentSteps()
        self._checkpoints = Checkpointer(self._store, self._state, monitor=lambda: self.monitor, warn_once=self._warn_once)
        self._rollbacks = Rollbacks(self.config, self._store, self._state, self._judge, self.policy, self._recent)
        self._tests = CauseTests(threshold=self._judge.detector_config.threshold)
        self.step = 0
        """Index of the next optimizer step (vetoed steps count: they keep their index)."""
        self._warned: set[str] = set()
        self._closed = False
        self._start_sample = 0  # the data stream's position in samples where the monitor starts counting
        self._job = job_fingerprint(model, optimizer, scheduler)  # before any step: what this job is
        # The veto runs in the optimizer's step hooks, registered before the monitor's so that it
        # judges first and the monitor's hooks of a vetoed call stand down (`skip_step(inside_step=True)`).
        self._steps = StepJudgement(self.config, self._judge, self.policy, monitor=lambda: self.monitor,
                                    scale_lrs=scheduler is None, warn_once=self._warn_once,
                                    global_norm=self._global_norm, claim_draws=lambda p: self._feed.claim_draws(p), model=model)  # fmt: skip
        self._gate = StepGate(optimizer, self._steps.on_step)
        self._replays = ReplaySteps(self._tests, self._state, self._steps, self._judge, self.policy,
                                    monitor=lambda: self.monitor, skip=self._skip_stretch, rollback=self._rollback,
                                    target=self._target)  # fmt: skip
        self._feed = Feed(self._stream, self._draws, self._replays, accumulate=self.config.accumulate,
                          step=lambda: self.step, monitor=lambda: self.monitor, untested=self._act_untested)  # fmt: skip
        resumed = self._resume()
        self.monitor: Monitor = self._watch()
        if resumed is not None:
            self.monitor.event("guard_resume", checkpoint=str(resumed.path), rollbacks=self.rollbacks,
                               lr_scale=self.lr_scale, clip=self.clip)  # fmt: skip
        # A rollback target of this run's own before the first periodic one, taken when the loop
        # begins (after a prefetching loop drew its first batch, which the checkpoint then holds).
        self._checkpoint_due = False  # a checkpoint's step passed while the guard was replaying or acting
        self._first_checkpoint = resumed is None or resumed.path is None or resumed.path.parent != self._store.directory
        # Its own forward hook: the monitor captures the loss only on the steps it records (`every`).
        self._forward_hook = model.register_forward_hook(torch.compiler.disable(self._steps.on_forward), with_kwargs=True)

    # ------------------------------------------------------------------------------ public API

    clip = property(lambda self: self.policy.clip, doc="The clipping norm in use (tightened by rollbacks).")
    lr_scale = property(lambda self: self.policy.lr_scale, doc="Product of the LR factors of all rollbacks.")
    rollbacks = property(lambda self: self.policy.rollbacks, doc="Rollbacks so far (a resume counts the earlier run's).")
    vetoes = property(lambda self: self.policy.vetoes, doc="Vetoed steps so far.")
    data_skips = property(lambda self: self.policy.data_skips, doc="Batches skipped as a corrupt stretch of data.")
    actions = property(lambda self: self.policy.actions, doc="What the guard did, in order (as in the events).")

    def __iter__(self) -> Guard:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._closed:
            raise StopIteration
        more = self._feed.micro_batch(self._steps.pending)
        if more is not None:
            return more
        self._finish_step()
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            raise StopIteration
        p = self._steps.pending = self._feed.begin(drawing=False)
        return p.step, p.batches[0]

    def steps(self) -> Iterator[int]:
        """The optimizer steps of a loop that draws its own batches through `draw`: yields the index
        of each step (after a rollback, the step returned to). Between two yields the guard
        finishes the step: checkpoint, rollback. Ends at `max_steps`; closes the guard when the
        loop ends (a `break` included).

        Example:
            >>> get_batch = guard.draw  # doctest: +SKIP
            >>> for iter_num in guard.steps():  # doctest: +SKIP
            ...     X, Y = get_batch("train"); model(X, Y)[1].backward(); optimizer.step(); optimizer.zero_grad()
        """
        try:
            while not self._closed:
                if self._steps.pending is not None:  # a step whose optimizer.step() never ran has them still
                    self._feed.claim_draws(self._steps.pending)
                self._finish_step()
                if self.config.max_steps is not None and self.step >= self.config.max_steps:
                    return
                self._steps.pending = self._feed.begin(drawing=True)
                yield self.step
        finally:
            self.close()

    def draw(self, *args: Any, **kwargs: Any) -> Any:
        """The next training batch of `data`, for a loop that draws its own (`get_batch = guard.draw`).

        Arguments go to a callable source (`get_batch("train")`). A function's draw with gradients
        disabled (an evaluation's batches) is a plain call of it: not counted, and the same in a
        replay. Batches drawn ahead (a prefetch) stay the loop's: a rollback writes the batches the
        checkpoint's loop held into them, in place.
        """
        return self._feed.draw(*args, **kwargs)

    def record(self, loss: float | torch.Tensor | None = None, *, sample_ids: Any = None, sample_losses: Any = None,
               **extra: Any) -> None:  # fmt: skip
        """Give the step's loss (and sample ids) to the guard and the monitor, before `optimizer.step()`.

        Needed when the model's forward does not return the loss (a scalar, a dict or an HF-style
        output with `.loss`). Several calls in one step (micro-batches) are averaged.

        Args:
            loss: The loss of the step or micro-batch (a tensor of several elements, e.g. one per
                replica, counts as their mean).
            sample_ids: Ids of the batch's samples; the guard's events name them.
            sample_losses: Per-sample losses, for the monitor.
            **extra: Further scalars for the monitor.

        Example:
            >>> guard.record(loss=loss, sample_ids=batch["ids"])  # doctest: +SKIP
        """
        p = self._steps.pending
        if p is not None and p.verdict is None:
            p.add_record(loss, sample_ids)
        self.monitor.record(loss, sample_ids=sample_ids, sample_losses=sample_losses, **extra)

    def request_rollback(self) -> None:
        """Ask for a rollback at the end of the current step (on every rank), as if damage were found."""
        self._steps.rollback_requested = True

    @property
    def skipped_positions(self) -> list[int]:
        """Data positions (batches drawn since the start) that are never handed out again."""
        return sorted(self._stream.skip)

    def close(self) -> None:
        """Remove the guard's hooks and close the monitor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._store.close()
        self._checkpoints.report_landed()
        self._forward_hook.remove()
        self._draws.clear()
        self._gate.remove()
        self.monitor.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------ between steps

    def _finish_step(self) -> None:
        p, self._steps.pending = self._steps.pending, None
        if self._first_checkpoint:
            self._first_checkpoint = False
            self._checkpoint()
        if p is None:
            return
        if p.probe is not None:  # a replay step: judged, never applied (`ReplaySteps.finish` acts on its test)
            self.step = p.step + 1
            self._checkpoint_due |= self.step % self.config.checkpoint_every == 0
            self._replays.finish(p)
            return
        norms, self._steps.norms_of_step = self._steps.norms_of_step, None
        if p.verdict is None:
            self._steps.judge_unstepped(p)
        v = p.verdict
        self._recent.add(p, norms)
        decision = self._judge.record(v, lrs=p.lrs) if v is not None else None
        if decision is not None and decision.cause == "optimizer_state":  # what collapsed, and by how much
            decision.evidence["optimizer_state"] = self._steps.collapse or {}
        self._steps.collapse = None
        self._tests.remember(p)
        self.step = p.step + 1
        if self._store.writing:
            self._checkpoints.report_landed()
        due = self._checkpoint_due or self.step % self.config.checkpoint_every == 0
        if decision is None:
            self._replays.confirm_schedule(self.step)
            self._checkpoint_due = False
            if due:  # at the first step the guard does not act on after a boundary it crossed acting
                self._checkpoint()
        else:
            self._checkpoint_due = due  # The data or the state? Replays test the cause before the guard acts (`replay.py`).
            plan = self._tests.plan(decision, self._recent.between(decision.onset_step, self.step))
            if plan == "skip":
                decision.evidence["cause_test"] = {**(self._tests.sound or {}), "state_unchanged_since_probe": True}
                self._skip_stretch(decision, last_vetoed=self.step - 1)
            elif plan == "rollback":
                self._replays.roll_back(decision)

    def _checkpoint(self) -> None:
        guard = {"step": self.step, "samples": self.monitor.sample_offset, **self.policy.state_dict(),
                 "skip": sorted(self._stream.skip), "judge": self._judge.state_dict(), "job": self._job}  # fmt: skip
        healthy = self._judge.incident is None and self._judge.vetoes_in_row == 0
        self._checkpoints.take(self.step, guard, healthy=healthy)
        self._tests.checkpointed(self.step)

    # ------------------------------------------------------------------------ acting on a cause

    def _act_untested(self) -> None:
        """A replay the loop cannot take (its held batches are of another shape): roll back untested."""
        self._warn_once("probe", "spikedoc guard: the loop holds batches of another shape than those a replay step "
                        "would hand out: the guard acts on its decisions untested")  # fmt: skip
        self._rollback(*self._tests.abandon())

    def _skip_stretch(self, decision: Decision, *, last_vetoed: int) -> None:
        positions = sorted(pos for seen in self._recent.between(decision.onset_step, self.step) for pos in seen.positions)
        if self.data_skips + len(positions) > self.config.max_data_skips:
            self.policy.data_skips += len(positions)
            self._stop("data", f"{self.data_skips} batches of a corrupt stretch of data skipped, more than "
                       f"max_data_skips={self.config.max_data_skips}", decision)  # fmt: skip
        detail = self._rollbacks.skip_stretch(decision, positions, last_vetoed=last_vetoed)
        if detail["remedy_reverted"] and self._global_norm is None:  # under FSDP2 the guard clips, not the monitor
            self.monitor.config.clip = self.clip  # the guard owns clipping; the data_skip event records the change
        self.actions.append({"kind": "data_skip", **detail})
        self.monitor.event("data_skip", **json_plain(detail))
        log.warning("spikedoc guard: steps %d-%d vetoed on a corrupt stretch of data; skipped without rolling back",
                    *detail["steps"])

    def _target(self, decision: Decision) -> tuple[Checkpoint, dict[str, Any]]:
        """The good checkpoint to roll back to for `decision`, with its state; stops the run when the
        budget is spent or none precedes the incident."""
        stop = cause.stop_for(decision, self.policy, max_rollbacks=self.config.max_rollbacks)
        if stop is not None:
            self._stop(*stop, decision)
        found = self._rollbacks.target(decision.precursor_step, lambda checkpoint, exc: self.monitor.event(
            "checkpoint_refused", path=str(checkpoint.path), error=str(exc)))  # fmt: skip
        if found is None:
            self._stop("no_checkpoint", f"no good checkpoint at or before step {decision.precursor_step}, the incident's "
                       "earliest precursor", decision)  # fmt: skip
        assert found is not None
        return found

    def _rollback(self, decision: Decision, found: tuple[Checkpoint, dict[str, Any]] | None = None, *,
                  data: bool | None = None) -> None:  # fmt: skip
        """Roll back to `found` (None: the target `_target` picks) with the remedy for `decision`;
        `data`: what a same-batch replay showed of its suspect batches (`plan_remedy`)."""
        recurring = cause.recurring(decision, self.policy)
        target, state = found if found is not None else self._target(decision)
        from_step = self.step
        self._checkpoints.report_landed()  # into the segment that wrote them (finding the target waited for the last)
        self.monitor.close()
        self._restore(state)
        evidence = self._rollbacks.remedy(decision, float(state["guard"]["lr_scale"]), recurring=recurring, data=data,
                                           loop_clip=self.monitor.loop_clip)
        self._store.forget_after(target.step)
        self.monitor = self._watch()
        detail = {"from_step": from_step, "to_step": target.step, "checkpoint": str(target.path), "reason": decision.reason,
                  "cause": decision.cause, "onset_step": decision.onset_step, "precursor_step": decision.precursor_step,
                  "rollbacks": self.rollbacks, **evidence, "evidence": decision.evidence}  # fmt: skip
        self.actions.append({"kind": "rollback", **detail})
        self.monitor.event("rollback", **json_plain(detail))
        log.warning("spikedoc guard: rolled back from step %d to %d (%s)", from_step, target.step, decision.reason)

    def _restore(self, state: dict[str, Any]) -> None:
        if not self._state.load(state):
            self._warn_once("held", "spikedoc guard: the loop holds batches drawn before the rollback that the "
                            "checkpoint's loop did not (or of another shape): the replay's first batches differ")  # fmt: skip
        if not self._stream.exact:
            self._warn_once("inexact", "spikedoc guard: data is a one-shot iterator, which cannot be rewound: the replay "
                            "continues where it is, exact only for a stream that draws its batches from the "
                            "random generators the guard restored (random offsets); pass a re-iterable, a "
                            "StatefulDataLoader or a function for an exact replay")  # fmt: skip
        self._judge.load_state_dict(state["guard"]["judge"])
        self._steps.moments.reset()  # another state: the next step is its baseline
        self._tests.sound = self._tests.transient = None
        self._start_sample = int(state["guard"].get("samples", 0))
        self.step = int(state["step"])
        self._checkpoint_due = False
        self._steps.pending = None

    def _stop(self, reason: str, message: str, decision: Decision) -> None:
        diagnosis = {"reason": reason, "step": self.step, "rollbacks": self.rollbacks, "decision": asdict(decision),
                     "actions": self.policy.rollback_actions()}  # fmt: skip
        self.actions.append({"kind": "guard_stop", "reason": reason, "step": self.step})
        self.monitor.event("guard_stop", **json_plain({k: v for k, v in diagnosis.items() if k != "step"}))
        self.close()
        raise GuardStopped(f"spikedoc guard stopped the run at step {self.step}: {message} (incident: {decision.reason}, "
                           f"onset step {decision.onset_step}); see the guard_stop event in {self.run_dir}", diagnosis)

    # ---------------------------------------------------------------------------------- set-up

    def _resume(self) -> Checkpoint | None:
        point = resume_point(self._store, self.config.resume, job=self._job, run_dir=self.run_dir)
        if point is None:
            return None
        checkpoint, state = point
        self._restore(state)
        self.policy.load_state_dict(state["guard"])
        self._stream.skip = {int(s) for s in state["guard"]["skip"]}
        return checkpoint

    def _watch(self) -> Monitor:
        # The scheduler's record (meta.json and the judge) tells its warm restarts from LR jumps.
        self._judge.schedule = {"start_step": self.step, "scheduler": describe_scheduler(self.scheduler)}
        # Every rank numbers the new segment from meta.json (written by rank 0 only) and its own
        # parts: the other ranks open first, then rank 0 writes it, so all agree on the number.
        clip = self.clip if self._global_norm is None else None  # under FSDP2 the guard clips (`StepJudgement`)
        monitor = rank_zero_last(lambda: watch(self.model, self.optimizer, run_dir=self.run_dir, clip=clip,
                                               scaler=self.scaler, start_step=self.step, start_sample=self._start_sample,
                                               scheduler=self.scheduler, **self._watch_options))  # fmt: skip
        monitor.leave_spike_detection_to_caller()  # the judgement flags spikes (`densify` on its flags)
        return monitor

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
