"""Guard: a training loop that vetoes bad steps, checkpoints, and rolls back damage by itself."""

from __future__ import annotations

import logging
import math
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.detector.streaming import DetectorConfig
from spikedoc.analysis.recovery import RecoveryConfig
from spikedoc.errors import GuardStopped
from spikedoc.guard.agree import agree, agree_all, common_steps, world
from spikedoc.guard.checkpoint import Checkpoint, CheckpointError, host_copy
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.data import DataStream, batch_to, copy_into
from spikedoc.guard.job import differences, job_fingerprint
from spikedoc.guard.judge import Decision, Judge, Verdict
from spikedoc.guard.payload import buffer_patterns
from spikedoc.guard.remedy import plan_remedy, reset_implicated
from spikedoc.guard.rng import rng_state, set_rng_state
from spikedoc.guard.schedule import apply_lrs, group_lrs, scale_schedule
from spikedoc.guard.sharded import GlobalNorm, checkpoint_store, clip_shards, is_fsdp, load_training_state, training_state
from spikedoc.monitor.meta import describe_scheduler
from spikedoc.monitor import Monitor, watch
from spikedoc.monitor._step import extract_loss

__all__ = ["Guard"]

log = logging.getLogger(__name__)

#: Recent steps whose batch position, sample ids and per-tensor gradient norms are remembered, to
#: name and skip an incident's batches: the lookback plus the recovery judgement's patience fit.
_REMEMBERED_STEPS = 1024


@dataclass(kw_only=True)
class _Pending:
    """The step the loop is working on: from the batch handed out to the next one."""

    step: int
    positions: list[int]
    """Data positions of the step's batches (more than one under gradient accumulation)."""
    losses: list[Tensor] = field(default_factory=list)
    """Losses given to `record` this step (detached; a tensor of several elements as their mean)."""
    forward_losses: list[Tensor] = field(default_factory=list)
    """Losses the model's forwards returned this step (used when `record` gave none)."""
    sample_ids: list[Any] = field(default_factory=list)
    forwards: int = 0
    """Forwards with gradients this step (micro-batches: the accumulation the guard counts)."""
    batches: list[Any] = field(default_factory=list)
    """The batches handed out for it (when the guard hands them out): kept if it is applied healthy."""
    handed: int = 1
    sample_offset: int = 0
    """The monitor's sample offset when the step began (its first batch's stream position, in samples)."""
    probe: Decision | None = None
    """A probe step: the last healthy step's batches again, judged and never applied, to test whether
    the state (rather than the data) is broken before acting on this decision."""
    verdict: Verdict | None = None
    lrs: list[float] | None = None

    def loss(self) -> Tensor | None:
        """The step's loss: the mean of those given to `record`, else of those the forwards returned."""
        losses = self.losses or self.forward_losses
        if len(losses) <= 1:
            return losses[0] if losses else None  # one micro-batch: no op at all
        device = losses[0].device
        return torch.stack([x.float().reshape(()).to(device) for x in losses]).mean()


@dataclass(kw_only=True)
class _Seen:
    """A step the guard remembers, to name and skip an incident's batches and find its tensors."""

    step: int
    positions: list[int]
    """Data positions of its batches."""
    sample_ids: list[Any]
    grad_norms: tuple[Tensor, list[Tensor]] | None
    """Per-tensor gradient norms and the parameters in that order (kept when reset_moments=True)."""
    bad_loss: bool = False
    """Vetoed for its loss: non-finite or far out of band before the update (the batch looked bad)."""


class Guard:
    """Iterate training batches under a guard: bad steps vetoed, damage rolled back, every action recorded.

    Yields `(step, batch)`; a loop that draws its own batches uses `guard.draw` and iterates
    `guard.steps()` instead (nanoGPT's shape: `hooks/guarded_nanogpt.py`). Includes `spikedoc.watch` (same run directory and recording) and owns
    global-norm clipping (`clip=`, the monitor's). Before each optimizer step it judges the step's
    loss and gradient norm (one host sync per step, plus one all_reduce under torch.distributed); a
    step with a non-finite value or one far out of the band is not applied. Between steps it
    checkpoints every `checkpoint_every` steps and, when the damage judgement says the run did not
    recover, rolls back to the newest good checkpoint before the incident with the LR schedule
    scaled by `lr_factor`, clipping tightened and the blamed batches skipped; before blaming the
    data for vetoes that pile up again, a probe step tests the state. Records the events `veto`,
    `checkpoint`, `rollback`, `data_skip`, `checkpoint_failed`, `guard_resume` and `guard_stop`.

    Args:
        model: The module trained.
        optimizer: Its optimizer (an Accelerate `AcceleratedOptimizer`: the one inside).
        scheduler: The LR scheduler, saved in checkpoints and scaled on rollback; None: the LR the
            loop sets (by hand) is scaled around each step.
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
        optimizer, scheduler = _unwrapped(optimizer, scheduler)
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
        self._judge = Judge(self.config, detector=detector, recovery=recovery)
        self.step = 0
        """Index of the next optimizer step (vetoed steps count: they keep their index)."""
        self.clip = self.config.clip
        """The clipping norm in use (tightened by rollbacks)."""
        self.lr_scale = 1.0
        """Product of the LR factors of all rollbacks: the schedule in use is the original times this."""
        self.rollbacks = 0
        self.vetoes = 0
        self.data_skips = 0
        self.actions: list[dict[str, Any]] = []
        """What the guard did, in order: one dict per veto, rollback and stop (as in the events)."""
        self._hold: dict[str, Any] | None = None
        self._pending: _Pending | None = None
        self._recent: deque[_Seen] = deque(maxlen=_REMEMBERED_STEPS)
        self._requested = False
        self._last_good: _Pending | None = None
        """Positions and batches of the last step applied with its loss in band (a probe's batches)."""
        self._probing: Decision | None = None
        self._norms_of_step: tuple[Tensor, list[Tensor]] | None = None
        self._warned: set[str] = set()
        self._closed = False
        self._start_sample = 0  # the data stream's position in samples where the monitor starts counting
        self._drawn: deque[tuple[int, Any]] = deque()
        """(position, batch) drawn by the loop through `draw` and not yet taken by a step (prefetched)."""
        self._replay: deque[tuple[int, Any]] = deque()
        """Batches a resumed checkpoint's loop held: the next `draw` calls return them."""
        self._job = job_fingerprint(model, optimizer, scheduler)  # before any step: what this job is
        resumed = self._resume_if_asked()
        self.monitor: Monitor = self._watch()
        if resumed is not None:
            self.monitor.event("guard_resume", checkpoint=str(resumed.path), rollbacks=self.rollbacks,
                               lr_scale=self.lr_scale, clip=self.clip)  # fmt: skip
        # A rollback target of this run's own before the first periodic one, taken when the loop
        # begins (after a prefetching loop drew its first batch, which the checkpoint then holds).
        self._first_checkpoint = resumed is None or resumed.path is None or resumed.path.parent != self._store.directory
        # Its own forward hook: the monitor captures the loss only on the steps it records (`every`).
        self._forward_hook = model.register_forward_hook(torch.compiler.disable(self._on_forward), with_kwargs=True)
        self._original_step = optimizer.__dict__.get("step")
        optimizer.step = self._step_wrapper()  # the veto must run before the update, inside step()

    # ------------------------------------------------------------------------------ public API

    def __iter__(self) -> Guard:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._closed:
            raise StopIteration
        p = self._pending
        if p is not None and p.verdict is None and p.handed < self.config.accumulate:
            p.handed += 1
            if p.probe is not None:
                return p.step, p.batches[(p.handed - 1) % len(p.batches)]
            position, batch = self._next_batch()  # the next micro-batch of the same step
            p.positions.append(position)
            p.batches.append(batch)
            return p.step, batch
        self._finish_step()
        if self.config.max_steps is not None and self.step >= self.config.max_steps:
            raise StopIteration
        if self._probing is not None and self._last_good is not None:
            good = self._last_good
            # The monitor records the probe at its batches' stream position, and counts on from where it was after.
            self._pending = _Pending(step=self.step, positions=list(good.positions), batches=good.batches,
                                     sample_offset=self.monitor.sample_offset, probe=self._probing)  # fmt: skip
            self.monitor.skip_samples(good.sample_offset - self.monitor.sample_offset)
            self._probing = None
            return self.step, good.batches[0]
        position, batch = self._next_batch()
        self._pending = _Pending(step=self.step, positions=[position], batches=[batch],
                                 sample_offset=self.monitor.sample_offset)  # fmt: skip
        return self.step, batch

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
                p = self._pending
                if p is not None:  # the step's batches: the first ones its forwards took, in order
                    p.positions = [self._drawn.popleft()[0] for _ in range(min(len(self._drawn), max(p.forwards, 1)))]
                self._finish_step()
                if self.config.max_steps is not None and self.step >= self.config.max_steps:
                    return
                self._pending = _Pending(step=self.step, positions=[])
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
        if not torch.is_grad_enabled() and self._stream.kind == "callable":
            return self._stream.data(*args, **kwargs)
        if self._replay:
            position, batch = self._replay.popleft()
        else:
            position, batch = self._next_batch(*args, **kwargs)
        self._drawn.append((position, batch))
        return batch

    def _next_batch(self, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        position, batch = self._stream.next(*args, **kwargs)
        # Skipped batches are drawn but never trained on: counted, so that the monitor's sample
        # offsets (the stream positions analyze names) stay those of the data stream.
        if self._stream.skipped_samples:
            self.monitor.skip_samples(self._stream.skipped_samples)
        return position, batch

    def record(
        self,
        loss: float | Tensor | None = None,
        *,
        sample_ids: Any = None,
        sample_losses: Any = None,
        **extra: Any,
    ) -> None:
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
        p = self._pending
        if p is not None and p.verdict is None:
            if isinstance(loss, Tensor) and loss.numel():
                # several elements (one per replica, say): the step's loss is their mean, as the monitor's
                p.losses.append(loss.detach() if loss.numel() == 1 else loss.detach().float().mean())
            elif loss is not None and not isinstance(loss, Tensor):
                p.losses.append(torch.tensor(float(loss)))
            if sample_ids is not None:
                p.sample_ids.extend(sample_ids.tolist() if isinstance(sample_ids, Tensor) else list(sample_ids))
        self.monitor.record(loss, sample_ids=sample_ids, sample_losses=sample_losses, **extra)

    def request_rollback(self) -> None:
        """Ask for a rollback at the end of the current step (on every rank), as if damage were found."""
        self._requested = True

    @property
    def skipped_positions(self) -> list[int]:
        """Data positions (batches drawn since the start) that are never handed out again."""
        return sorted(self._stream.skip)

    def close(self) -> None:
        """Restore `optimizer.step` and close the monitor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._store.close()
        self._report_written()
        self._forward_hook.remove()
        self._drawn.clear()
        self._replay.clear()
        if self._original_step is not None:
            self.optimizer.step = self._original_step
        else:
            self.optimizer.__dict__.pop("step", None)
        self.monitor.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------- the step itself

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        p = self._pending
        if p is None or p.verdict is not None or not torch.is_grad_enabled():  # evaluation is no step's
            return
        p.forwards += 1
        loss = extract_loss(output)
        if loss is not None:
            p.forward_losses.append(loss.detach())

    def _step_wrapper(self) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            self.optimizer._opt_called = True  # what an LR scheduler's own wrapper would note
            return self._guarded_step(*args, **kwargs)

        # An LR scheduler built after the guard must not wrap this function as if it were a method.
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        return step

    def _guarded_step(self, *args: Any, **kwargs: Any) -> Any:
        p = self._pending
        step_fn = self._original_step or type(self.optimizer).step.__get__(self.optimizer)
        if p is None or p.verdict is not None:  # outside the iteration, or a second step() in one
            return step_fn(*args, **kwargs)
        loss = p.loss()
        if loss is None:
            self._warn_once("no_loss", "Guard: no loss for this step (pass guard.record(loss=...) or return it from "
                            "the forward); only the gradient norm is judged")  # fmt: skip
        grad_norm = self.monitor.grad_norm()  # the monitor's own pass: its statistics and clipping reuse it
        if grad_norm is None:
            self._warn_once("grad_norm", "Guard: the gradient norm could not be computed (see the monitor's warning); "
                            "only the loss is judged")  # fmt: skip
            grad_norm = torch.zeros(())  # not judged: a log-scale band ignores non-positive values
        elif self.config.reset_moments:  # kept to find the implicated tensors of a rollback
            self._norms_of_step = self.monitor.tensor_grad_norms()
        if self._global_norm is not None and (norms := self.monitor.tensor_grad_norms()) is not None:
            grad_norm = self._global_norm.share(*norms)  # this rank's share of the squared global norm
        values = agree(loss, grad_norm, rollback_request=self._requested, sharded=self._global_norm is not None)
        self._requested = False
        verdict = self._judge.judge(p.step, values)
        p.verdict = verdict
        if p.probe is not None:  # judged, never applied
            self.monitor.skip_step()
            return None
        if verdict.veto or verdict.loss_flagged or verdict.grad_flagged:
            self.monitor.densify(p.step + 1)  # the steps after a flag get the full statistics
        # The LR the loop set (by a scheduler or by hand), times the guard's factor when no scheduler
        # was given to scale, held below its caps; the loop's own value is back after the step.
        caps = self._hold["caps"] if self._hold is not None and p.step >= self._hold["from_step"] else None
        restore = apply_lrs(self.optimizer, self.lr_scale if self.scheduler is None else 1.0, caps)
        p.lrs = group_lrs(self.optimizer)
        try:
            if verdict.veto:
                self._veto(p, verdict)
                return None
            if self._global_norm is not None and self.clip is not None:  # the monitor cannot clip shards
                clip_shards([q for g in self.optimizer.param_groups for q in g["params"]], values.grad_norm, self.clip,
                            observer=self.monitor)  # fmt: skip
            return step_fn(*args, **kwargs)
        finally:
            if restore is not None:  # the schedule's own value again: only the applied LR is held
                for group, lr in zip(self.optimizer.param_groups, restore):
                    group["lr"] = lr

    def _veto(self, p: _Pending, verdict: Verdict, *, stepped: bool = True) -> None:
        self.vetoes += 1
        detail = {"positions": p.positions, "sample_ids": p.sample_ids[:64], **verdict.evidence()}
        if not stepped:
            detail["optimizer_step_skipped"] = True  # by the loop or its GradScaler, before the guard saw it
        self.actions.append({"kind": "veto", "step": p.step, **detail})
        self.monitor.event("veto", at_step=p.step, **_plain(detail))
        if stepped:
            self.monitor.skip_step()

    def _judge_unstepped(self, p: _Pending) -> None:
        """A step whose `optimizer.step()` never ran (a GradScaler skips it on inf/NaN gradients):
        judged on its loss alone. A non-finite or far out-of-band loss counts as a veto, so a run
        stuck on non-finite values (every step skipped) still reaches the rollback; an ordinary
        one (a routine loss-scale backoff) is neither a veto nor learnt."""
        loss = p.loss()
        if loss is None:
            return
        verdict = self._judge.judge(p.step, agree(loss, torch.zeros(()), rollback_request=False))
        if verdict.veto:
            p.verdict = verdict
            self._veto(p, verdict, stepped=False)

    # ------------------------------------------------------------------------------ between steps

    def _finish_step(self) -> None:
        p, self._pending = self._pending, None
        if self._first_checkpoint:
            self._first_checkpoint = False
            self._checkpoint()
        if p is None:
            return
        if p.probe is not None:
            self._finish_probe(p)
            return
        norms, self._norms_of_step = self._norms_of_step, None
        if p.verdict is None:
            self._judge_unstepped(p)
        v = p.verdict
        bad_loss = v is not None and v.veto and ("loss_out_of_band" in v.reasons or not math.isfinite(v.loss))
        self._recent.append(_Seen(step=p.step, positions=p.positions, sample_ids=p.sample_ids, grad_norms=norms,
                                  bad_loss=bad_loss))  # fmt: skip
        decision = self._judge.record(p.verdict, lrs=p.lrs) if p.verdict is not None else None
        if v is not None and not v.veto and not v.loss_flagged and p.batches:
            self._last_good = p
        self.step = p.step + 1
        if self._store.writing:
            self._report_written()
        if decision is not None and self._corrupt_stretch(decision) and self._last_good is not None:
            self._probing = decision  # the data or the state? the next step tests it before acting
        elif decision is not None:
            self._rollback(decision)
        elif self.step % self.config.checkpoint_every == 0:
            self._checkpoint()

    def _checkpoint(self) -> None:
        healthy = self._judge.incident is None and self._judge.vetoes_in_row == 0
        ok = False
        try:
            state = host_copy({
                "held": [[position, batch] for position, batch in self._drawn],
                **training_state(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            })
            state.update(rng=rng_state(), data=self._stream.state_dict(), guard=self._policy_state())
            self._store.save(self.step, state, healthy=healthy)
            ok = True
            if self._store.coerced:
                self._warn_once("coerced", f"spikedoc guard: {', '.join(self._store.coerced[:5])} held numpy scalars; "
                                "checkpoints store them as Python numbers so that torch.load(weights_only=True) "
                                "loads them")  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            self._checkpoint_failed(self.step, exc)
        ok = self.step not in self._report_written() and ok  # a foreground write has landed by now
        if not agree_all(ok) and ok:  # another rank failed: this step is no common rollback target
            self._store.forget_after(self.step - 1)

    def _report_written(self) -> set[int]:
        """Record the checkpoint files that landed since the last call; the steps of those that failed."""
        failed = set()
        for checkpoint, error in self._store.landed():
            if error is None:
                self.monitor.event("checkpoint", at_step=checkpoint.step, path=str(checkpoint.path),
                                   healthy=checkpoint.healthy, guard=True)  # fmt: skip
            else:
                failed.add(checkpoint.step)
                self._checkpoint_failed(checkpoint.step, error)
        return failed

    def _checkpoint_failed(self, step: int, error: BaseException) -> None:
        # The guard's own failure never stops training: warn, record, go on with older checkpoints.
        # A state refused for what it holds is refused at every checkpoint: one warning says it.
        message = f"spikedoc guard: checkpoint of step {step} failed ({error}); training continues"
        if isinstance(error, CheckpointError) and "weights_only" in str(error):  # no step in it: the same each time
            self._warn_once(str(error), message)
        else:
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        self.monitor.event("checkpoint_failed", at_step=step, error=str(error), guard=True)

    def _policy_state(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.monitor.sample_offset, "clip": self.clip, "lr_scale": self.lr_scale,
                "skip": sorted(self._stream.skip),
                "rollbacks": self.rollbacks, "vetoes": self.vetoes, "data_skips": self.data_skips, "hold": self._hold,
                "judge": self._judge.state_dict(), "job": self._job}  # fmt: skip

    # -------------------------------------------------------------------------------- rollback

    def _vetoed(self, decision: Decision) -> list[_Seen]:
        latest = {seen.step: seen for seen in self._recent}  # a replayed step: its latest batches
        return [latest[step] for step in range(decision.onset_step, self.step) if step in latest]

    def _vetoed_positions(self, decision: Decision) -> list[int]:
        return sorted(pos for seen in self._vetoed(decision) for pos in seen.positions)

    def _corrupt_stretch(self, decision: Decision) -> bool:
        """Vetoes piling up at the data positions right after those already skipped, each for its
        loss: the replay of a healthy state reached the same place in the data and the batches there
        still look bad before any update, so the data is at fault, not the weights. (Vetoes for the
        gradient alone, with an ordinary loss, say nothing about the data: those still roll back.)"""
        if decision.reason != "vetoes":
            return False
        vetoed = self._vetoed(decision)
        positions = sorted(pos for seen in vetoed for pos in seen.positions)
        return bool(positions) and positions[0] - 1 in self._stream.skip and all(seen.bad_loss for seen in vetoed)

    def _finish_probe(self, p: _Pending) -> None:
        """Act on the decision the probe tested: the last healthy step's batches, given to the state
        the vetoes came from, still have their loss in band (the state is sound: the data is at
        fault, skip it), or not (the state is broken: roll back, whatever the data)."""
        if p.verdict is None:  # its optimizer step never ran (a GradScaler skipped it): the loss alone
            loss = p.loss()
            p.verdict = self._judge.judge(p.step, agree(loss if loss is not None else torch.tensor(math.nan),
                                                        torch.zeros(()), rollback_request=False))  # fmt: skip
        self.monitor.skip_samples(p.sample_offset - self.monitor.sample_offset)
        v, decision = p.verdict, p.probe
        assert decision is not None
        broken = not math.isfinite(v.loss) or v.loss_flagged or "loss_out_of_band" in v.reasons
        decision.evidence["cause_test"] = {"probe_step": p.step, "probe_positions": p.positions, "loss": v.loss,
                                           "loss_z": v.loss_z, "found": "state" if broken else "data"}  # fmt: skip
        self.step = p.step + 1
        if broken:
            self._rollback(decision)
        else:
            self._skip_stretch(decision)

    def _skip_stretch(self, decision: Decision) -> None:
        positions = self._vetoed_positions(decision)
        self.data_skips += len(positions)
        if self.data_skips > self.config.max_data_skips:
            self._stop("data", f"{self.data_skips} batches of a corrupt stretch of data skipped, more than "
                       f"max_data_skips={self.config.max_data_skips}", decision)  # fmt: skip
        self._stream.skip.update(positions)
        self._judge.forget_vetoes()
        last = decision.evidence.get("cause_test", {}).get("probe_step", self.step) - 1  # the last vetoed step
        detail = {"steps": [decision.onset_step, last], "positions": positions, "data_skips": self.data_skips,
                  "remedy_reverted": self._revert_remedy(positions[0]), **decision.evidence}
        self.actions.append({"kind": "data_skip", **detail})
        self.monitor.event("data_skip", **_plain(detail))
        log.warning("spikedoc guard: steps %d-%d vetoed on a corrupt stretch of data; skipped without rolling back",
                    decision.onset_step, last)

    def _revert_remedy(self, first_position: int) -> bool:
        """Undo the LR and clipping change of the rollback whose skipped batches this stretch continues:
        it was made on the hypothesis that the state was at fault, and the data turned out to be."""
        rollback = next((a for a in reversed(self.actions) if a["kind"] == "rollback"), None)
        if (rollback is None or rollback["reason"] != "vetoes" or rollback.get("lr_held") or rollback.get("reverted")
                or first_position - 1 not in rollback.get("skipped_positions", [])):
            return False
        before = float(rollback["lr_scale_before"])
        self._scale_schedule(before / self.lr_scale)
        self.lr_scale, self.clip = before, rollback["clip_before"]
        if self._global_norm is None:  # the guard owns clipping; the data_skip event records the change
            self.monitor.config.clip = self.clip
        rollback["reverted"] = True
        return True

    def _rollback(self, decision: Decision) -> None:
        previous = next((a for a in reversed(self.actions) if a["kind"] == "rollback"), None)
        # The replay met trouble again before passing the step it had rolled back from: the fault
        # returns from a good state, with the remedies so far.
        recurring = previous is not None and decision.onset_step <= previous["from_step"]
        if self.rollbacks >= self.config.max_rollbacks and recurring:
            reset = any(a.get("moments_reset") for a in self.actions if a["kind"] == "rollback")
            self._stop("recurring", f"the fault came back after the last of {self.rollbacks} rollbacks to a good "
                       f"checkpoint (LR at {self.lr_scale:.3g}x{', optimizer moments reset' if reset else ''}): it is in "
                       "the state or the loop, not in the data, and one more rollback will not fix it", decision)  # fmt: skip
        if self.rollbacks >= self.config.max_rollbacks:
            self._stop("budget", f"rollback budget spent ({self.rollbacks} of max_rollbacks={self.config.max_rollbacks})",
                       decision)  # fmt: skip
        target, state = self._target(decision.precursor_step)
        if target is None:
            self._stop("no_checkpoint", f"no good checkpoint at or before step {decision.precursor_step}, the incident's "
                       "earliest precursor", decision)  # fmt: skip
        from_step = self.step
        self._report_written()  # into the segment that wrote them (finding the target waited for the last)
        self.monitor.close()
        saved_scale = float(state["guard"]["lr_scale"])
        self._restore(state)
        remedy = plan_remedy(decision, config=self.config, clip=self.clip, lr_scale=self.lr_scale, hold=self._hold,
                             batches={s.step: (s.positions, s.sample_ids) for s in self._recent},
                             clipped=self._judge.clipped_share(self.clip))  # fmt: skip
        evidence = remedy.evidence(clip_before=self.clip, jump=decision.lr_jump)
        evidence["lr_scale_before"] = self.lr_scale
        self.clip, self.lr_scale, self._hold = remedy.clip, remedy.lr_scale, remedy.hold
        self._stream.skip.update(remedy.skip_positions)
        self._scale_schedule(self.lr_scale / saved_scale)
        evidence["reset_optimizer_state_for"] = reset_implicated(
            self.model, self.optimizer, decision, {s.step: s.grad_norms for s in self._recent if s.grad_norms is not None}
        ) if self.config.reset_moments else []  # fmt: skip
        if recurring:  # escalate: beyond the LR cut, every moment starts afresh (Adam's bias correction)
            self.optimizer.state.clear()
            evidence["recurring"] = evidence["moments_reset"] = True
        self.rollbacks += 1
        self._store.forget_after(target.step)
        self.monitor = self._watch()
        detail = {"from_step": from_step, "to_step": target.step, "checkpoint": str(target.path), "reason": decision.reason,
                  "cause": decision.cause, "onset_step": decision.onset_step, "precursor_step": decision.precursor_step,
                  "rollbacks": self.rollbacks, **evidence, "evidence": decision.evidence}  # fmt: skip
        if self._stream.kind in ("callable", "iterator") and remedy.skip_positions:
            detail["skipped_by"] = "fresh_draws"  # a function or iterator has no batch to leave out: others are drawn
        self.actions.append({"kind": "rollback", **detail})
        self.monitor.event("rollback", **_plain(detail))
        log.warning("spikedoc guard: rolled back from step %d to %d (%s)", from_step, target.step, decision.reason)

    def _target(self, before: int) -> tuple[Checkpoint | None, dict[str, Any] | None]:
        """The newest readable good checkpoint at or before `before`, with its state."""
        while True:
            target = self._store.rollback_target(before)
            if target is None:
                return None, None
            try:
                return target, self._store.load(target)
            except CheckpointError as exc:
                warnings.warn(f"spikedoc guard: {exc}; trying an older checkpoint", RuntimeWarning, stacklevel=4)
                self.monitor.event("checkpoint_refused", path=str(target.path), error=str(exc))
                before = target.step - 1

    def _restore(self, state: dict[str, Any]) -> None:
        load_training_state(self.model, self.optimizer, state)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # The source first (a re-iterable's fast-forward draws from the random generators), then
        # the generators: a source drawing from the global RNG draws the same batches again.
        self._stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        self._restore_held(state.get("held") or [])
        if not self._stream.exact:
            self._warn_once("inexact", "spikedoc guard: data is a one-shot iterator, which cannot be rewound: the replay "
                            "continues where it is, exact only for a stream that draws its batches from the "
                            "random generators the guard restored (random offsets); pass a re-iterable, a "
                            "StatefulDataLoader or a function for an exact replay")  # fmt: skip
        self._judge.load_state_dict(state["guard"]["judge"])
        self._start_sample = int(state["guard"].get("samples", 0))
        self.step = int(state["step"])
        self._pending = None

    def _restore_held(self, held: list[Any]) -> None:
        """The batches the checkpoint's loop held (drawn ahead) into those the loop holds now, in place."""
        saved = deque((int(position), batch) for position, batch in held)
        now, self._drawn = list(self._drawn), deque()
        exact = True
        for _, batch in now:
            if saved and copy_into(batch, saved[0][1]):
                self._drawn.append((saved[0][0], batch))
                saved.popleft()
            else:
                exact = False
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._replay = deque((position, batch_to(batch, device)) for position, batch in saved)  # a resume
        if not exact:
            self._warn_once("held", "spikedoc guard: the loop holds batches drawn before the rollback that the "
                            "checkpoint's loop did not (or of another shape): the replay's first batches differ")  # fmt: skip

    def _scale_schedule(self, factor: float) -> None:
        # With a scheduler, its whole schedule is scaled; without one, the factor is applied to the
        # LR the loop sets at each step (`apply_lrs`), and the optimizer's own values stay.
        if self.scheduler is not None:
            scale_schedule(self.optimizer, self.scheduler, factor)

    def _stop(self, reason: str, message: str, decision: Decision) -> None:
        diagnosis = {"reason": reason, "step": self.step, "rollbacks": self.rollbacks, "decision": asdict(decision),
                     "actions": [a for a in self.actions if a["kind"] == "rollback"]}  # fmt: skip
        self.actions.append({"kind": "guard_stop", "reason": reason, "step": self.step})
        self.monitor.event("guard_stop", **_plain({k: v for k, v in diagnosis.items() if k != "step"}))
        self.close()
        raise GuardStopped(f"spikedoc guard stopped the run at step {self.step}: {message} (incident: {decision.reason}, "
                           f"onset step {decision.onset_step}); see the guard_stop event in {self.run_dir}", diagnosis)

    # ---------------------------------------------------------------------------------- set-up

    def _resume_if_asked(self) -> Checkpoint | None:
        resume = self.config.resume
        if resume is False:
            return None  # another run's checkpoints in the directory are left alone and never used
        if isinstance(resume, (str, Path)):
            try:
                checkpoint, state = self._store.read(resume)
            except CheckpointError as exc:
                raise ValueError(f"Guard(resume={str(resume)!r}): {exc}") from None
            return self._resume_from(checkpoint, state, explicit=True)
        self._store.adopt()
        newest = {c.step: c for c in self._store.checkpoints()}  # per step, the healthy one if both
        # Under torch.distributed every rank resumes from the same step: one every rank has and reads.
        for step in common_steps(list(newest)):
            try:
                state, ok = self._store.load(newest[step]), True
            except CheckpointError as exc:
                warnings.warn(f"spikedoc guard: cannot resume from {exc}; trying an older checkpoint", RuntimeWarning,
                              stacklevel=3)  # fmt: skip
                state, ok = None, False
            if agree_all(ok):
                return self._resume_from(newest[step], state, explicit=resume is True)
        if resume:
            raise ValueError(f"Guard(resume=True): no readable guard checkpoint in {self._store.directory}")
        return None

    def _resume_from(self, checkpoint: Checkpoint, state: dict[str, Any], *, explicit: bool) -> Checkpoint:
        """Continue from `state`: asked for (`explicit`), or automatically only for the same job, loudly."""
        changed = differences(state["guard"].get("job"), self._job)
        where = f"{checkpoint.path} (step {checkpoint.step})"
        if changed and not explicit:
            raise ValueError(f"Guard: {self.run_dir} holds checkpoints of another job ({'; '.join(changed[:4])}): "
                             "pass resume=False to start fresh there (they are left alone and never loaded), "
                             "resume=True to continue them anyway, or another run_dir")  # fmt: skip
        if changed:
            message = f"spikedoc guard: resuming from {where} as asked, although the job differs: {'; '.join(changed[:4])}"
        else:
            message = (f"spikedoc guard: resuming from {where}: the same job (model, optimizer, hyperparameters) "
                       "stopped there; pass resume=False to start fresh")  # fmt: skip
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self._restore(state)
        g = state["guard"]
        self.clip = g["clip"]
        self.lr_scale, self.rollbacks, self.vetoes = float(g["lr_scale"]), int(g["rollbacks"]), int(g["vetoes"])
        self.data_skips = int(g.get("data_skips", 0))
        self._stream.skip = {int(s) for s in g["skip"]}
        self._hold = g["hold"]
        return checkpoint

    def _watch(self) -> Monitor:
        def open_monitor() -> Monitor:
            # The scheduler's record (meta.json and the judge) tells its warm restarts from LR jumps.
            self._judge.schedule = {"start_step": self.step, "scheduler": describe_scheduler(self.scheduler)}
            clip = self.clip if self._global_norm is None else None  # under FSDP2 the guard clips (`_guarded_step`)
            return watch(self.model, self.optimizer, run_dir=self.run_dir, clip=clip, scaler=self.scaler,
                         start_step=self.step, start_sample=self._start_sample, scheduler=self.scheduler,
                         **self._watch_options)  # fmt: skip

        if world() is None:
            return self._judging(open_monitor())
        # Every rank numbers the new segment from meta.json (written by rank 0 only) and its own
        # parts: the other ranks open first, then rank 0 writes it, so all agree on the number.
        monitor = open_monitor() if world()[0] != 0 else None
        torch.distributed.barrier()
        return self._judging(monitor if monitor is not None else open_monitor())

    @staticmethod
    def _judging(monitor: Monitor) -> Monitor:
        monitor.leave_spike_detection_to_caller()  # the judgement flags spikes (`densify` on its flags)
        return monitor

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _unwrapped(optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[torch.optim.Optimizer, Any]:
    """The torch optimizer and scheduler inside wrappers such as Accelerate's `AcceleratedOptimizer`
    and `AcceleratedScheduler`: the guard judges, checkpoints and scales those, and its veto wraps
    the inner optimizer's `step`, which the wrapper's own `step()` calls (with its GradScaler)."""
    while not hasattr(optimizer, "_optimizer_step_pre_hooks") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):  # fmt: skip
        optimizer = optimizer.optimizer
    lr_scheduler = torch.optim.lr_scheduler.LRScheduler
    while scheduler is not None and not isinstance(scheduler, lr_scheduler) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return optimizer, scheduler


def _plain(value: Any) -> Any:
    """Event detail as strict JSON: non-finite floats become None (NaN) or "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
