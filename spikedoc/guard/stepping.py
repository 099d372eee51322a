"""The step under way: its losses gathered from the forwards and `record`, judged inside `optimizer.step()`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.guard.agree import agree
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.gate import StepGate
from spikedoc.guard.judge import Judge, Verdict
from spikedoc.guard.moments import SecondMoments
from spikedoc.guard.payload import json_plain
from spikedoc.guard.policy import Policy
from spikedoc.guard.schedule import group_lrs
from spikedoc.guard.sharded import GlobalNorm, clip_shards
from spikedoc.guard.steps import PendingStep
from spikedoc.monitor import Monitor, extract_loss

__all__ = ["StepJudgement"]


class StepJudgement:
    """Follows the pending step (`pending`, set by the guard's iteration) and judges it before its update.

    `on_step` is the `StepGate`'s callback: it judges the step's loss, gradient norm and the
    optimizer's second moments (`SecondMoments`; one host sync for all), vetoes it through the gate
    or applies the guard's LR factor and hold to it, and records a veto. `on_forward` is a forward hook on the model: it counts the step's micro-batches and keeps
    the losses its forwards return.
    """

    def __init__(self, config: GuardConfig, judge: Judge, policy: Policy, *, monitor: Callable[[], Monitor],
                 scale_lrs: bool, warn_once: Callable[[str, str], None], global_norm: GlobalNorm | None = None,
                 claim_draws: Callable[[PendingStep], None] = lambda p: None, model: nn.Module | None = None) -> None:  # fmt: skip
        self.config, self.judge, self.policy = config, judge, policy
        self._model = model  # names the tensors of a collapse
        self._global_norm = global_norm  # FSDP2: the judged norm is the full gradient's, and the guard clips
        self.claim_draws = claim_draws
        """Fills in a drawing loop's step's positions and batches (`PendingStep.claim_draws`) before it is judged."""
        self._monitor = monitor
        self._scale_lrs = scale_lrs  # no scheduler to scale: the guard's factor applies to the LR the loop set
        self._warn_once = warn_once
        self.pending: PendingStep | None = None
        self.rollback_requested = False
        self.norms_of_step: tuple[Tensor, list[Tensor]] | None = None
        """The pending step's per-tensor gradient norms (with `reset_moments`), taken once it is judged."""
        self.moments = SecondMoments()
        """The optimizer's second moments, checked for a collapse before each judged update."""
        self.collapse: dict[str, Any] | None = None
        """The collapsed tensors of the pending step, when its second moments collapsed."""

    def on_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        p = self.pending
        if p is None or p.verdict is not None or not torch.is_grad_enabled():  # evaluation is no step's
            return
        p.forwards += 1
        loss = extract_loss(output)
        if loss is not None:
            p.forward_losses.append(loss.detach())

    def on_step(self, gate: StepGate) -> None:
        """Judge the step inside `optimizer.step()`, before the update (the gate's pre-hook)."""
        p, monitor = self.pending, self._monitor()
        self.moments.calls += 1  # every call may update the state, judged or not
        if p is None or p.verdict is not None:  # outside the iteration, or a second step() in one
            return
        self.claim_draws(p)  # a veto's event names the step's batches
        loss = p.loss()
        if loss is None:
            self._warn_once("no_loss", "Guard: no loss for this step (pass guard.record(loss=...) or return it from "
                            "the forward); only the gradient norm is judged")  # fmt: skip
        grad_norm = monitor.grad_norm()  # the monitor's own pass: its statistics and clipping reuse it
        if grad_norm is None:
            self._warn_once("grad_norm", "Guard: the gradient norm could not be computed (see the monitor's warning); "
                            "only the loss is judged")  # fmt: skip
            grad_norm = torch.zeros(())  # not judged: a log-scale band ignores non-positive values
        elif self.config.reset_moments:  # kept to find the implicated tensors of a rollback
            self.norms_of_step = monitor.tensor_grad_norms()
        if self._global_norm is not None and (norms := monitor.tensor_grad_norms()) is not None:
            grad_norm = self._global_norm.share(*norms)  # this rank's share of the squared global norm
        collapsed = self.moments.measure(gate.optimizer)
        values = agree(loss, grad_norm, rollback_request=self.rollback_requested, sharded=self._global_norm is not None,
                       collapsed=collapsed)  # fmt: skip
        self.rollback_requested = False
        verdict = self.judge.judge(p.step, values)
        p.verdict = verdict
        if values.collapsed_moments:  # never the baseline; which tensors, for the events (a sync on this step only)
            names = {id(q): name for name, q in self._model.named_parameters()} if self._model is not None else {}
            self.collapse = self.moments.collapsed(names)
        else:
            self.moments.accept()
        if p.probe is not None:  # judged, never applied
            gate.veto()
            monitor.skip_step(inside_step=True)
            return
        if verdict.veto or verdict.loss_flagged or verdict.grad_flagged:
            monitor.densify(p.step + 1)  # the steps after a flag get the full statistics
        # The LR the loop set (by a scheduler or by hand), times the guard's factor when no scheduler
        # was given to scale, held below its caps; the gate sets the loop's own value back after the step.
        gate.scale_lrs(self.policy.lr_scale if self._scale_lrs else 1.0, self.policy.caps(p.step))
        p.lrs = group_lrs(gate.optimizer)
        if verdict.veto:
            gate.veto()
            self.veto(p, verdict)
        elif self._global_norm is not None and self.policy.clip is not None:  # the monitor cannot clip shards
            params = [q for group in gate.optimizer.param_groups for q in group["params"]]
            clip_shards(params, values.grad_norm, self.policy.clip, observer=monitor)

    def judge_unstepped(self, p: PendingStep, *, as_veto: bool = True) -> None:
        """A step whose `optimizer.step()` never ran (a GradScaler skips it on inf/NaN gradients):
        judged on its loss alone. A non-finite or far out-of-band loss counts as a veto, so a run
        stuck on non-finite values (every step skipped) still reaches the rollback; an ordinary
        one (a routine loss-scale backoff) is neither a veto nor learnt. A probe (`as_veto=False`)
        keeps its verdict whatever it is, one without a loss as non-finite."""
        loss = p.loss()
        if loss is None and as_veto:
            return
        verdict = self.judge.judge(p.step, agree(loss if loss is not None else torch.tensor(math.nan), torch.zeros(()),
                                                 rollback_request=False))  # fmt: skip
        if not as_veto:
            p.verdict = verdict
        elif verdict.veto:
            p.verdict = verdict
            self.veto(p, verdict, stepped=False)

    def veto(self, p: PendingStep, verdict: Verdict, *, stepped: bool = True) -> None:
        """Count and record a vetoed step (`stepped`: inside its `optimizer.step()` call)."""
        self.policy.vetoes += 1
        detail = {"positions": p.positions, "sample_ids": p.sample_ids[:64], **verdict.evidence()}
        if self.collapse and "optimizer_state_collapsed" in verdict.reasons:
            detail["optimizer_state"] = self.collapse
        if not stepped:
            detail["optimizer_step_skipped"] = True  # by the loop or its GradScaler, before the guard saw it
        self.policy.actions.append({"kind": "veto", "step": p.step, **detail})
        monitor = self._monitor()
        monitor.event("veto", at_step=p.step, **json_plain(detail))
        if stepped:
            monitor.skip_step(inside_step=True)
