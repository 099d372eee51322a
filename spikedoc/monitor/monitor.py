"""The Monitor: optimizer-step and forward hooks that record every optimizer step of a training run."""

from __future__ import annotations

import atexit
import logging
import math
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.monitor import clipping as _clipping
from spikedoc.monitor._caller import caller_stacklevel
from spikedoc.monitor._collect import StepContext, grad_stats, post_stats, run_job
from spikedoc.monitor._gradients import StepGradients
from spikedoc.monitor._open import open_run, tensorboard_mirror
from spikedoc.monitor._optim_list import OptimizerList
from spikedoc.monitor._plan import build_plan
from spikedoc.monitor._scaler import unwatch_updates, watch_updates
from spikedoc.monitor._sink import StepSink
from spikedoc.monitor._step import StepRecord, deferred_value, extract_loss
from spikedoc.monitor.budget import Cadence
from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.distributed import Ranks
from spikedoc.monitor.fingerprint import Fingerprint
from spikedoc.store.writer import RunWriter

__all__ = ["Monitor"]

logger = logging.getLogger(__name__)

_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()


class Monitor:
    """Records one training run, per optimizer step, to a spikedoc run directory (Parquet).

    Created by `spikedoc.watch`; see it for the arguments. The columns of its step and layer tables
    are `spikedoc.store.schema`'s (documented in docs/run-format.md).

    Example:
        >>> import tempfile, torch, spikedoc
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> with spikedoc.watch(model, opt, run_dir=tempfile.mkdtemp()) as monitor:
        ...     for _ in range(3):
        ...         model(torch.randn(8, 4)).pow(2).mean().backward()
        ...         opt.step(); opt.zero_grad()
        >>> monitor.step
        3
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
        run_dir: str | Path,
        config: WatchConfig,
        scaler: Any = None,
        scheduler: Any = None,
    ) -> None:
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        # Several optimizers are read as one: their groups in turn, their states merged.
        self.optimizer = self.optimizers[0] if len(self.optimizers) == 1 else OptimizerList(self.optimizers)
        self.model, self.config, self.scaler = model, config, scaler
        self._stepped: set[int] = set()  # ids of the optimizers that stepped in the current step
        self.run_dir = Path(run_dir)
        self._warned: set[str] = set()
        self._loss_warned = False
        self._closed = False
        self._handles: list[Any] = []
        self._pending: StepRecord | None = None
        self._steps_since_update = 0
        self._standing_down = False  # this optimizer.step() call was vetoed from a hook before ours
        self._sample_offset = config.start_sample
        self._last_end = math.nan
        self._explicit_batches = False  # begin_micro_batch() counts micro-batches instead of forwards
        self._ranks = Ranks()
        self._step_context: StepContext | None = None  # what the step's statistics need; made with the plan
        self._grads: StepGradients | None = None
        self._cadence = Cadence(budget=config.budget) if config.budget is not None else None
        self._build_plan()
        start = config.start_step if config.start_step is not None else self._optimizer_step_count()
        self._cur = self._new_step(start)
        self.writer = RunWriter(
            self.run_dir, rank=self._ranks.rank, flush_every=config.flush_every, flush_seconds=config.flush_seconds
        )
        self._sink = StepSink(self.writer, ranks=self._ranks, cadence=self._cadence, fail=self._fail)
        self.segment = open_run(self.writer, model=model, optimizers=self.optimizers, plan=self.plan, config=config,
                                scaler=scaler, scheduler=scheduler, start=start, fail=self._fail)  # fmt: skip
        if config.tensorboard is not None:
            tensorboard_mirror(self.writer, config.tensorboard, model, self.plan, self._fail)
        pre = torch.compiler.disable(self._on_forward_pre)  # runs eagerly around compiled graphs
        post = torch.compiler.disable(self._on_forward)
        self._clip_hook = torch.compiler.disable(self._on_clip)  # a compiled train step: a graph break
        self._handles += [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]
        for opt in self.optimizers:
            self._handles += [opt.register_step_pre_hook(self._on_step_pre),
                              opt.register_step_post_hook(self._on_step_post)]  # fmt: skip
        if scaler is not None:
            watch_updates(scaler, self._before_scaler_update)
        _clipping.observe(self)  # the loop's own clip_grad_norm_: norms before it, its max norm
        _OPEN.add(self)

    # ------------------------------------------------------------------------------- public API

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._cur.index

    @property
    def dropped_rows(self) -> int:
        """Rows lost: steps whose statistics failed plus rows the writer could not write."""
        return self._sink.dropped + self.writer.dropped_rows

    def record(
        self,
        loss: float | Tensor | None = None,
        *,
        sample_ids: Any = None,
        sample_losses: Any = None,
        **extra: float | int | bool | Tensor,
    ) -> None:
        """Attach values to the current step (or, right after `optimizer.step()`, to that step).

        A call made after the optimizer step and before the next forward belongs to the step just
        taken; any other call belongs to the step being accumulated. Losses given here replace the
        auto-captured loss of the step (several calls: their mean); `sample_ids` and
        `sample_losses` of several calls are concatenated; an extra scalar keeps its last value.

        Args:
            loss: The step's (or micro-batch's) loss (a tensor of several elements, e.g. one per
                replica, counts as their mean).
            sample_ids: Ints or strings naming the samples of the batch.
            sample_losses: Per-sample losses aligned with `sample_ids`.
            **extra: Further scalars, each stored in a column of its name.

        Example:
            >>> monitor.record(loss=loss, sample_ids=batch["ids"], tokens_per_sec=tps)  # doctest: +SKIP
        """
        try:
            st = self._cur
            if st.forwards == 0 and self._pending is not None:
                st = self._pending
            if not st.logged:
                return
            ongoing = st is self._cur
            if loss is not None:
                st.recorded.setdefault("losses", []).append(deferred_value(st, loss, ongoing=ongoing))
            for key, value in (("sample_ids", sample_ids), ("sample_losses", sample_losses)):
                if value is not None:
                    st.recorded.setdefault(key, []).append(deferred_value(st, value, ongoing=ongoing))
            for key, value in extra.items():
                st.recorded.setdefault("extra", {})[key] = deferred_value(st, value, ongoing=ongoing)
        except Exception as exc:  # noqa: BLE001
            self._fail("record", exc)

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(row)` with each step row as it is written (one step late, on the training thread).

        The row is the dict the steps table receives (`step`, `loss`, `grad_norm`, ...). Integrations
        use it to judge the run online; an exception in `callback` is one warning, never a crash.

        Example:
            >>> monitor.subscribe(lambda row: print(row["step"], row["loss"]))  # doctest: +SKIP
        """
        self._sink.subscribers.append(callback)

    def begin_micro_batch(self, *inputs: Any, **named: Any) -> None:
        """A training micro-batch with these inputs begins (for loops whose training call is not a forward).

        Frameworks like Lightning call `training_step`, not the module's forward: this counts the
        micro-batch and fingerprints its inputs as the forward hook would. Once called, forwards of
        the watched module no longer count micro-batches (their loss is still captured).

        Example:
            >>> monitor.begin_micro_batch(batch)  # doctest: +SKIP
        """
        self._explicit_batches = True
        self._count_micro_batch(inputs, named)

    def gradients_ready(self) -> None:
        """This step's gradients are final: take their statistics now.

        For steps whose gradients are computed inside `optimizer.step(closure)` (Lightning's
        automatic optimization, LBFGS), after the step pre-hook has run. Call it between the
        closure's backward and the update (Lightning: `on_before_optimizer_step`).
        """
        st = self._cur
        if self._closed or not st.work or st.broken:
            return
        try:
            self._grads.take_now(st)
            st.clipped_versions = self._grads.versions()  # a clip right after finds them taken
        except Exception as exc:  # noqa: BLE001 - monitoring never stops training
            self._fail("gradients_ready", exc, st)

    def grad_norm(self) -> Tensor | None:
        """This step's global gradient norm before clipping, taken once with the step's own statistics.

        Call between the last backward and `optimizer.step()`: the step's statistics and `clip=`
        then reuse it instead of reading the gradients again. In float32, unscaled for a fused
        optimizer under a GradScaler, over the local shards of sharded parameters.

        Returns:
            A device scalar (no host sync); None when it cannot be computed (e.g. sparse
            gradients, after a warning) or the monitor is closed.
        """
        return None if self._closed else self._grads.total(self._cur)

    def tensor_grad_norms(self) -> tuple[Tensor, list[Tensor]] | None:
        """This step's per-tensor gradient norms before clipping (as `grad_norm`) and their parameters, in that order."""
        return None if self._closed else self._grads.per_tensor(self._cur)

    def event(self, kind: str, *, at_step: int | None = None, **detail: Any) -> None:
        """Record an event (e.g. `event("checkpoint", path=...)`) at the next step's index, or at
        `at_step` (an event about a step already recorded).

        A checkpoint event with step s holds the state after steps 0..s-1: resuming from it
        re-runs step s.
        """
        try:
            self.writer.add_event(kind, self._cur.index if at_step is None else int(at_step), **detail)
        except Exception as exc:  # noqa: BLE001
            self._fail("event", exc)

    def densify(self, step: int) -> None:
        """Under a cost budget, the full statistics for every step from `step` for the next 50, as
        after a spike the budget's own detector flags; no effect without a budget."""
        if self._cadence is not None:
            self._cadence.densify(step)

    def leave_spike_detection_to_caller(self) -> None:
        """The budget's own spike detector stands down: the caller judges every step's loss and
        gradient norm with that same detector and reports its flags with `densify` (the guard does,
        before each update), so the series are not judged twice."""
        if self._cadence is not None:
            self._cadence.detects_spikes = False

    @property
    def sample_offset(self) -> int:
        """Stream position (in samples) of the next step's first sample: what `start_sample` resumes from."""
        return self._sample_offset

    def skip_samples(self, count: int) -> None:
        """Note `count` samples drawn from the data but never trained on (batches a loop skips), so
        that the `sample_offset` of later steps stays their position in the data stream."""
        self._sample_offset += int(count)

    def wait(self) -> None:
        """Return once the statistics of every step so far are computed.

        They are computed inside the step hooks (on an accelerator, queued on its stream before the
        step returns), so they always are by the time the loop goes on: changing parameters or
        optimizer state between steps needs no wait. Kept for loops that call it before such a change.
        """

    def skip_step(self, *, inside_step: bool = False) -> None:
        """Record the current step as taken but not applied (`skipped`): call it instead of
        `optimizer.step()` when a step is deliberately not applied, e.g. vetoed by a guard.

        The step keeps its index and its gradient statistics, has no update statistics, and a
        GradScaler's next `update()` does not count it a second time.

        Args:
            inside_step: Called from an optimizer step pre-hook registered before the monitor's
                (the guard's veto, which lets the `step()` call run with no gradients): the
                monitor's own hooks of that call stand down.
        """
        self._steps_since_update += 1
        self._skipped_step()
        self._standing_down = inside_step

    def close(self) -> None:
        """Write the last step, remove the hooks and flush the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _clipping.unobserve(self)
        if self._stepped:
            self._end_partial_step()
        self._consume()
        for handle in self._handles:
            handle.remove()
        if self.scaler is not None:
            unwatch_updates(self.scaler)
        try:
            self.writer.add_event("close", self._cur.index, dropped_rows=self.dropped_rows)
        finally:
            self.writer.close()
            _OPEN.discard(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------------------- planning

    def _build_plan(self) -> None:
        self._consume()  # (re)planning a watched run: finish what used the old plan first
        plan = build_plan(self.model, self.optimizers, self.optimizer, world=self._ranks.world, clip=self.config.clip)
        self.plan = plan
        if self._step_context is None:
            self._step_context = StepContext(plan=plan, optimizer=self.optimizer, scaler=self.scaler, fail=self._fail)
            self._grads = StepGradients(self._step_context, replan=self._build_plan, fail=self._fail)
        self._step_context.plan = plan

    def _optimizer_step_count(self) -> int:
        counts = [s["step"] for s in self.optimizer.state.values() if isinstance(s, Mapping) and "step" in s]
        return int(max((float(c) for c in counts), default=0))

    def _records(self, index: int) -> tuple[bool, bool]:
        """Whether step `index` gets a step row and layer rows."""
        return index % self.config.every == 0, index % self.config.layer_every == 0

    def _new_step(self, index: int) -> StepRecord:
        logged, layers = self._records(index)
        fingerprint = Fingerprint(pad_token_id=self.config.pad_token_id, measure=logged)
        full = self._cadence.full(index) if self._cadence is not None and (logged or layers) else True
        return StepRecord(index=index, logged=logged, layers=layers, fingerprint=fingerprint, full=full)

    # ------------------------------------------------------------------------------------ hooks

    def _on_forward_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or self._explicit_batches:  # evaluation forwards are not part of a step
            return
        self._count_micro_batch(args, kwargs)

    def _count_micro_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._stepped:  # some of several optimizers stepped and training moved on: that step is over
            self._end_partial_step()
        st = self._cur
        st.forwards += 1
        try:
            work = st.fingerprint.note(args, kwargs)
            if work is not None:
                run_job(self._step_context, st, "fingerprint", work)
        except Exception as exc:  # noqa: BLE001
            self._fail("fingerprint", exc, st)

    def _on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        st = self._cur
        if not (st.logged and torch.is_grad_enabled()):
            return
        try:
            loss = extract_loss(output)
            if loss is not None:
                loss = loss.detach().float().reshape(())
                st.loss_sum = loss if st.loss_sum is None else st.loss_sum + loss
                st.loss_count += 1
                if kwargs.get("num_items_in_batch") is not None:  # HF: a share of the step's loss
                    st.loss_shares = True
        except Exception as exc:  # noqa: BLE001
            self._fail("loss", exc, st)

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        if self._standing_down:
            return
        if self._stepped:
            if id(optimizer) not in self._stepped:
                return  # the next of several optimizers: the step's gradients and snapshot are taken
            self._end_partial_step()  # the same optimizer again: the others did not step last time
        start = time.perf_counter()
        self._consume()
        st = self._cur
        try:
            self._step_pre(optimizer, st)
        finally:
            st.cost += time.perf_counter() - start

    def _step_pre(self, optimizer: torch.optim.Optimizer, st: StepRecord) -> None:
        if not (st.work or self.config.clip is not None):
            return
        if st.broken:  # its statistics are lost, but clip= is part of training: still apply it
            st = StepRecord(index=st.index, logged=False, layers=False, fingerprint=st.fingerprint)
        try:
            self._grads.replan_if_groups_changed()
            self._grads.forget_if_changed_after_clip(st)
            # A GradScaler leaves unscaling and inf-skipping to optimizers that support it (fused
            # Adam): it sets `grad_scale` and `found_inf` on the optimizer for the step() call.
            grad_scale = getattr(optimizer, "grad_scale", None)
            grad_stats(self._step_context, st, clip=self.config.clip, grad_scale=grad_scale)
            found_inf = getattr(optimizer, "found_inf", None)
            if isinstance(found_inf, Tensor) and st.work:
                st.packer.add("found_inf", found_inf.float().sum())
        except Exception as exc:  # noqa: BLE001
            self._fail("step_pre", exc, st)

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._standing_down:
            self._standing_down = False
            return
        self._stepped.add(id(optimizer))
        if len(self._stepped) < len(self.optimizers):
            return  # one training step is every optimizer's step()
        self._end_partial_step()

    def _end_partial_step(self) -> None:
        """End the current step after the optimizers that stepped in it (all of them, or fewer)."""
        self._stepped = set()
        self._steps_since_update += 1
        st, start = self._cur, time.perf_counter()
        self._finish_step(skipped=False)
        st.cost += time.perf_counter() - start

    def before_clip(self, params: list[Tensor], max_norm: float) -> None:
        """The loop's own norm clip is about to scale the gradients: take their statistics first."""
        self._clip_hook(params, max_norm, None)

    def after_clip(self, params: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
        """The loop's own norm clip is done: note the coefficient it applied and its max norm."""
        self._clip_hook(params, max_norm, total_norm)

    def _on_clip(self, params: list[Tensor], max_norm: float, total_norm: Tensor | None) -> None:
        st = self._cur
        # max_norm=inf scales by 1: a loop (or a test) measuring the norm, not clipping.
        if self._closed or not st.work or st.broken or max_norm == math.inf:
            return
        try:
            self._grads.on_loop_clip(st, params, max_norm, total_norm)
        except Exception as exc:  # noqa: BLE001 - monitoring never stops training
            self._fail("loop_clip", exc, st)

    # ----------------------------------------------------------------------------- statistics

    def _finish_step(self, *, skipped: bool) -> None:
        st = self._cur
        now = time.time()
        st.time, st.step_time, st.skipped = now, now - self._last_end, skipped
        self._last_end = now
        try:
            if st.work and not st.broken:
                post_stats(self._step_context, st, skipped)
        except Exception as exc:  # noqa: BLE001
            self._fail("step_post", exc, st)
        finally:
            st.sample_offset = self._sample_offset
            self._sample_offset += st.fingerprint.samples
            st.grads, st.snapshots = {}, {}
            self._pending = st if st.work else None
            self._cur = self._new_step(st.index + 1)

    # ------------------------------------------------------------------------------ host side

    def _consume(self) -> None:
        """Turn the finished step into rows (its record() window is over), after its statistics landed."""
        st, self._pending = self._pending, None
        if st is None:
            return
        if st.logged and not self._loss_warned and st.loss_count == 0 and not st.recorded.get("losses"):
            self._warn_no_loss(st)
        self._sink.take(st, self.plan, self.config.clip)

    def _warn_no_loss(self, st: StepRecord) -> None:
        # A warning, not a log line: the loop has to change, and warnings show in a plain script.
        self._loss_warned = True
        seen = "the forward returned no loss" if st.forwards else "no forward of the watched model was seen"
        warnings.warn(
            f"spikedoc: step {st.index} ended with no loss ({seen}); add `monitor.record(loss=loss)` to the "
            "training loop (after computing the loss) so the run has a loss curve",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

    # ----------------------------------------------------------------------------------- misc

    def _before_scaler_update(self) -> None:
        # GradScaler skips optimizer.step() (and so our hooks) when grads hold inf/NaN; the next
        # update() is where that becomes visible, read before the scale changes.
        if self._closed:
            return
        if self._stepped:  # it skipped some of several optimizers only
            self._end_partial_step()
        if self._steps_since_update == 0:
            self._skipped_step()
        self._steps_since_update = 0

    def _skipped_step(self) -> None:
        self._consume()
        st = self._cur
        try:
            if st.work and not st.broken:
                grad_stats(self._step_context, st, clip=None)
        except Exception as exc:  # noqa: BLE001
            self._fail("skipped_step", exc, st)
        self._finish_step(skipped=True)

    def _fail(self, where: str, exc: BaseException, st: StepRecord | None = None) -> None:
        if st is not None:
            st.broken = True
        if where not in self._warned:
            self._warned.add(where)
            warnings.warn(
                f"spikedoc: {where} failed ({exc!r}); the affected rows are dropped and training continues",
                RuntimeWarning,
                stacklevel=3,
            )
            logger.warning("spikedoc: %s failed", where, exc_info=exc)
            try:
                self.writer.add_event("logging_error", self._cur.index, where=where, error=repr(exc))
            except Exception:  # noqa: BLE001 - the writer may be what failed
                pass


@atexit.register
def _close_open_monitors() -> None:
    # Registered after the writer's own atexit hook, so it runs first: pending rows reach the
    # writer before the writer closes.
    for monitor in list(_OPEN):
        try:
            monitor.close()
        except Exception:  # noqa: BLE001 - interpreter exit must not fail
            logger.debug("spikedoc: closing a monitor at exit failed", exc_info=True)
