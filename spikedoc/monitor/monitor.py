"""The Monitor: optimizer-step and forward hooks that record every optimizer step of a training run."""

from __future__ import annotations

import atexit
import logging
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.monitor import clipping as _clipping
from spikedoc.monitor._caller import caller_stacklevel
from spikedoc.monitor._collect import StepContext
from spikedoc.monitor._cycle import StepCycle
from spikedoc.monitor._gradients import StepGradients
from spikedoc.monitor._open import open_run, tensorboard_mirror
from spikedoc.monitor._optim_list import OptimizerList
from spikedoc.monitor._plan import build_plan
from spikedoc.monitor._scaler import unwatch_updates, watch_updates
from spikedoc.monitor._sink import StepSink
from spikedoc.monitor._step import StepRecord, deferred_value
from spikedoc.monitor.budget import Cadence
from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.distributed import Ranks
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
        self.run_dir = Path(run_dir)
        self._warned: set[str] = set()
        self._closed = False
        self._closed_record_warned = False
        self._handles: list[Any] = []
        self._ranks = Ranks()
        self._step_context: StepContext | None = None  # what the step's statistics need; made with the plan
        self._grads: StepGradients | None = None
        self._cycle: StepCycle | None = None
        self._cadence = Cadence(budget=config.budget) if config.budget is not None else None
        self._build_plan()
        start = config.start_step if config.start_step is not None else self._optimizer_step_count()
        self.writer = RunWriter(
            self.run_dir, rank=self._ranks.rank, flush_every=config.flush_every, flush_seconds=config.flush_seconds
        )
        self._sink = StepSink(self.writer, ranks=self._ranks, cadence=self._cadence, fail=self._fail)
        self._cycle = StepCycle(config=config, optimizers=self.optimizers, context=self._step_context,
                                gradients=self._grads, sink=self._sink, cadence=self._cadence, start=start,
                                sample_offset=config.start_sample, fail=self._fail)  # fmt: skip
        self.segment = open_run(self.writer, model=model, optimizers=self.optimizers, plan=self.plan, config=config,
                                scaler=scaler, scheduler=scheduler, start=start, fail=self._fail)  # fmt: skip
        if config.tensorboard is not None:
            tensorboard_mirror(self.writer, config.tensorboard, model, self.plan, self._fail)
        cycle = self._cycle
        pre = torch.compiler.disable(cycle.on_forward_pre)  # runs eagerly around compiled graphs
        post = torch.compiler.disable(cycle.on_forward)
        self._clip_hook = torch.compiler.disable(cycle.on_clip)  # a compiled train step: a graph break
        self._handles += [
            model.register_forward_pre_hook(pre, with_kwargs=True),
            model.register_forward_hook(post, with_kwargs=True),
        ]
        for opt in self.optimizers:
            self._handles += [opt.register_step_pre_hook(cycle.on_step_pre),
                              opt.register_step_post_hook(cycle.on_step_post)]  # fmt: skip
        if scaler is not None:
            watch_updates(scaler, cycle.before_scaler_update)
        _clipping.observe(self)  # the loop's own clip_grad_norm_: norms before it, its max norm
        _OPEN.add(self)

    # ------------------------------------------------------------------------------- public API

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._cycle.current.index

    @property
    def loop_clip(self) -> float | None:
        """The max norm the loop's own `clip_grad_norm_` used on the last step it clipped (the
        smallest, when it clips several parameter subsets); None while it has not clipped."""
        return self._grads.loop_clip

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
        if self._closed:
            self._warn_closed_record()
            return
        try:
            st = self._cycle.record_target()
            if not st.logged:
                return
            ongoing = st is self._cycle.current
            if loss is not None:
                st.recorded.setdefault("losses", []).append(deferred_value(st, loss, ongoing=ongoing))
            for key, value in (("sample_ids", sample_ids), ("sample_losses", sample_losses)):
                if value is not None:
                    st.recorded.setdefault(key, []).append(deferred_value(st, value, ongoing=ongoing))
            for key, value in extra.items():
                st.recorded.setdefault("extra", {})[key] = deferred_value(st, value, ongoing=ongoing)
        except Exception as exc:  # noqa: BLE001
            self._fail("record", exc)

    def _warn_closed_record(self) -> None:
        # A warning once, not silence: the step's values would be lost while the run looks recorded.
        if self._closed_record_warned:
            return
        self._closed_record_warned = True
        warnings.warn(
            f"spikedoc: record() on a closed monitor of {self.run_dir}: its values are dropped. A spikedoc.Guard "
            "replaces its monitor when it rolls back: call guard.record(...), or read guard.monitor at each step "
            "rather than keeping it",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )

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
        self._cycle.explicit_batches = True
        self._cycle.count_micro_batch(inputs, named)

    def gradients_ready(self) -> None:
        """This step's gradients are final: take their statistics now.

        For steps whose gradients are computed inside `optimizer.step(closure)` (Lightning's
        automatic optimization, LBFGS), after the step pre-hook has run. Call it between the
        closure's backward and the update (Lightning: `on_before_optimizer_step`).
        """
        st = self._cycle.current
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
        return None if self._closed else self._grads.total(self._cycle.current)

    def tensor_grad_norms(self) -> tuple[Tensor, list[Tensor]] | None:
        """This step's per-tensor gradient norms before clipping (as `grad_norm`) and their parameters, in that order."""
        return None if self._closed else self._grads.per_tensor(self._cycle.current)

    def event(self, kind: str, *, at_step: int | None = None, **detail: Any) -> None:
        """Record an event (e.g. `event("checkpoint", path=...)`) at the next step's index, or at
        `at_step` (an event about a step already recorded).

        A checkpoint event with step s holds the state after steps 0..s-1: resuming from it
        re-runs step s.
        """
        try:
            self.writer.add_event(kind, self.step if at_step is None else int(at_step), **detail)
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
        return self._cycle.sample_offset

    def skip_samples(self, count: int) -> None:
        """Note `count` samples drawn from the data but never trained on (batches a loop skips), so
        that the `sample_offset` of later steps stays their position in the data stream."""
        self._cycle.sample_offset += int(count)

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
        self._cycle.skip_step(inside_step=inside_step)

    def close(self) -> None:
        """Write the last step, remove the hooks and flush the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _clipping.unobserve(self)
        self._cycle.close()
        for handle in self._handles:
            handle.remove()
        if self.scaler is not None:
            unwatch_updates(self.scaler)
        try:
            self.writer.add_event("close", self.step, dropped_rows=self.dropped_rows)
        finally:
            self.writer.close()
            _OPEN.discard(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------------------- planning

    def _build_plan(self) -> None:
        if self._cycle is not None:
            self._cycle.consume()  # (re)planning a watched run: finish what used the old plan first
        plan = build_plan(self.model, self.optimizers, self.optimizer, world=self._ranks.world, clip=self.config.clip)
        self.plan = plan
        if self._step_context is None:
            self._step_context = StepContext(plan=plan, optimizer=self.optimizer, scaler=self.scaler, fail=self._fail)
            self._grads = StepGradients(self._step_context, replan=self._build_plan, fail=self._fail)
        self._step_context.plan = plan

    def _optimizer_step_count(self) -> int:
        counts = [s["step"] for s in self.optimizer.state.values() if isinstance(s, Mapping) and "step" in s]
        return int(max((float(c) for c in counts), default=0))

    def before_clip(self, params: list[Tensor], max_norm: float) -> None:
        """The loop's own norm clip is about to scale the gradients: take their statistics first."""
        self._clip_hook(params, max_norm, None)

    def after_clip(self, params: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
        """The loop's own norm clip is done: note the coefficient it applied and its max norm."""
        self._clip_hook(params, max_norm, total_norm)

    # ----------------------------------------------------------------------------------- misc

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
                self.writer.add_event("logging_error", self.step, where=where, error=repr(exc))
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
