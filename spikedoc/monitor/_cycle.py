"""A step's life: torch's forward and optimizer hooks open each optimizer step's record, fill it and close it.

A step begins with its first forward (or `begin_micro_batch`), gathers the loss of every micro-batch,
takes its gradient statistics before the update and the rest right after, and ends when every
optimizer has stepped, or as skipped (a GradScaler's inf skip, a guard's veto). Its rows are made
when the next step's work begins: until then `record()` may still add to it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.monitor._caller import caller_stacklevel
from spikedoc.monitor._collect import StepContext, grad_stats, post_stats, run_job
from spikedoc.monitor._gradients import StepGradients
from spikedoc.monitor._sink import StepSink
from spikedoc.monitor._step import StepRecord, extract_loss
from spikedoc.monitor.budget import Cadence
from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.fingerprint import Fingerprint

__all__ = ["StepCycle"]

Fail = Callable[[str, BaseException, "StepRecord | None"], None]


class StepCycle:
    """The current step's record and the hooks that move it along.

    Args:
        config: The monitor's settings (`every`, `layer_every`, `clip`, `pad_token_id`).
        optimizers: The watched optimizers: a step ends when each has stepped.
        context: What the step's statistics need (its plan is replaced when param groups change).
        gradients: When the step's gradient statistics are taken.
        sink: Where finished steps go.
        cadence: The cost budget's plan of full steps, if any.
        start: Index of the first step.
        sample_offset: Stream position (in samples) of the first step's first sample.
        fail: Report a failed statistic: the step's rows are dropped, training goes on.
    """

    def __init__(self, *, config: WatchConfig, optimizers: list[Any], context: StepContext, gradients: StepGradients,
                 sink: StepSink, cadence: Cadence | None, start: int, sample_offset: int, fail: Fail) -> None:  # fmt: skip
        self.config, self.optimizers, self.context = config, optimizers, context
        self.gradients, self.sink, self.cadence, self._fail = gradients, sink, cadence, fail
        self.sample_offset = sample_offset
        """Stream position (in samples) of the current step's first sample."""
        self.closed = False
        """Set when the monitor closes: the hooks still registered by others stand down."""
        self.explicit_batches = False
        """`begin_micro_batch()` counts micro-batches instead of the watched module's forwards."""
        self.current = self._new_step(start)
        self._pending: StepRecord | None = None  # the last finished step, until its rows are made
        self._stepped: set[int] = set()  # ids of the optimizers that stepped in the current step
        self._steps_since_update = 0
        self._standing_down = False  # this optimizer.step() call was vetoed from a hook before ours
        self._last_end = math.nan
        self._loss_warned = False

    def record_target(self) -> StepRecord:
        """The step a `record()` call belongs to: the one just taken, until the next forward."""
        if self.current.forwards == 0 and self._pending is not None:
            return self._pending
        return self.current

    # ------------------------------------------------------------------------------ forwards

    def on_forward_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or self.explicit_batches:  # evaluation forwards are not part of a step
            return
        self.count_micro_batch(args, kwargs)

    def count_micro_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """One more micro-batch with these inputs in the current step: fingerprint it."""
        if self._stepped:  # some of several optimizers stepped and training moved on: that step is over
            self.end_partial_step()
        st, start = self.current, time.perf_counter()
        if st.forwards == 0:
            st.began = start
        st.forwards += 1
        try:
            work = st.fingerprint.note(args, kwargs)
            if work is not None:
                run_job(self.context, st, "fingerprint", work)
        except Exception as exc:  # noqa: BLE001
            self._fail("fingerprint", exc, st)
        st.cost += time.perf_counter() - start  # the fingerprint is part of what the budget pays for

    def on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        st = self.current
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

    # ----------------------------------------------------------------------- optimizer steps

    def on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: dict[str, Any]) -> None:
        if self._standing_down:
            return
        if self._stepped:
            if id(optimizer) not in self._stepped:
                return  # the next of several optimizers: the step's gradients and snapshot are taken
            self.end_partial_step()  # the same optimizer again: the others did not step last time
        start = time.perf_counter()
        self.consume()
        st = self.current
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
            self.gradients.replan_if_groups_changed()
            self.gradients.forget_if_changed_after_clip(st)
            # A GradScaler leaves unscaling and inf-skipping to optimizers that support it (fused
            # Adam): it sets `grad_scale` and `found_inf` on the optimizer for the step() call.
            grad_scale = getattr(optimizer, "grad_scale", None)
            grad_stats(self.context, st, clip=self.config.clip, grad_scale=grad_scale)
            found_inf = getattr(optimizer, "found_inf", None)
            if isinstance(found_inf, Tensor) and st.work:
                st.packer.add("found_inf", found_inf.float().sum())
        except Exception as exc:  # noqa: BLE001
            self._fail("step_pre", exc, st)

    def on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._standing_down:
            self._standing_down = False
            return
        self._stepped.add(id(optimizer))
        if len(self._stepped) < len(self.optimizers):
            return  # one training step is every optimizer's step()
        self.end_partial_step()

    def end_partial_step(self) -> None:
        """End the current step after the optimizers that stepped in it (all of them, or fewer)."""
        self._stepped = set()
        self._steps_since_update += 1
        st, start = self.current, time.perf_counter()
        self._finish(skipped=False)
        st.cost += time.perf_counter() - start

    def on_clip(self, params: list[Tensor], max_norm: float, total_norm: Tensor | None) -> None:
        """The loop's own norm clip: before it (`total_norm` None) or after it."""
        st = self.current
        # max_norm=inf scales by 1: a loop (or a test) measuring the norm, not clipping.
        if self.closed or not st.work or st.broken or max_norm == math.inf:
            return
        try:
            self.gradients.on_loop_clip(st, params, max_norm, total_norm)
        except Exception as exc:  # noqa: BLE001 - monitoring never stops training
            self._fail("loop_clip", exc, st)

    # --------------------------------------------------------------------------- skipped steps

    def skip_step(self, *, inside_step: bool) -> None:
        """The current step is taken but not applied (see `Monitor.skip_step`)."""
        self._steps_since_update += 1
        self._skipped_step()
        self._standing_down = inside_step

    def before_scaler_update(self) -> None:
        # GradScaler skips optimizer.step() (and so our hooks) when grads hold inf/NaN; the next
        # update() is where that becomes visible, read before the scale changes.
        if self.closed:
            return
        if self._stepped:  # it skipped some of several optimizers only
            self.end_partial_step()
        if self._steps_since_update == 0:
            self._skipped_step()
        self._steps_since_update = 0

    def _skipped_step(self) -> None:
        self.consume()
        st = self.current
        try:
            if st.work and not st.broken:
                grad_stats(self.context, st, clip=None)
        except Exception as exc:  # noqa: BLE001
            self._fail("skipped_step", exc, st)
        self._finish(skipped=True)

    # ------------------------------------------------------------------------------- step's end

    def close(self) -> None:
        """End a step some optimizers took, and make the rows of the last one."""
        self.closed = True
        if self._stepped:
            self.end_partial_step()
        self.consume()

    def _finish(self, *, skipped: bool) -> None:
        st = self.current
        now = time.time()
        st.time, st.step_time, st.skipped = now, now - self._last_end, skipped
        st.busy_time = time.perf_counter() - st.began if st.forwards else st.step_time
        self._last_end = now
        try:
            if st.work and not st.broken:
                post_stats(self.context, st, skipped)
        except Exception as exc:  # noqa: BLE001
            self._fail("step_post", exc, st)
        finally:
            st.sample_offset = self.sample_offset
            self.sample_offset += st.fingerprint.samples
            st.grads, st.snapshots = {}, {}
            self._pending = st if st.work else None
            self.current = self._new_step(st.index + 1)

    def consume(self) -> None:
        """Turn the finished step into rows (its record() window is over), after its statistics landed."""
        st, self._pending = self._pending, None
        if st is None:
            return
        if st.logged and not self._loss_warned and st.loss_count == 0 and not st.recorded.get("losses"):
            self._warn_no_loss(st)
        self.sink.take(st, self.context.plan, self.config.clip)

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

    def _new_step(self, index: int) -> StepRecord:
        logged = index % self.config.every == 0
        layers = index % self.config.layer_every == 0
        fingerprint = Fingerprint(pad_token_id=self.config.pad_token_id, measure=logged)
        full = self.cadence.full(index) if self.cadence is not None and (logged or layers) else True
        return StepRecord(index=index, logged=logged, layers=layers, fingerprint=fingerprint, full=full)
