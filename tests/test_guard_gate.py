"""The guard's veto through the optimizer's step hooks: exact for each optimizer, composing with every wrapper."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import spikedoc
from spikedoc.guard.gate import StepGate
from tests.common.guarded import build, fill_grads_with_nan, garbage, loader
from tests.common.models import make_model

BAD = 5


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) as lion-pytorch writes it: parameters without a gradient are left alone."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(exp_avg.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
                exp_avg.lerp_(p.grad, 1 - beta2)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=3e-3, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=3e-3, fused=True),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
    "lion": lambda ps: Lion(ps, lr=3e-4, weight_decay=0.1),
}


def _train_with_a_bad_step(tmp_path, opt_name: str, *, bad: int = BAD, scaler=None):
    """Guarded steps up to `bad` + 1 with a bad step at `bad`: NaN gradients, or under a GradScaler
    (which skips a step with non-finite gradients itself) a garbage batch on a warm band. Returns the
    guard, the state right before and after that step's step() call and the gradients around it."""
    model = make_model(0)
    opt = OPTIMIZERS[opt_name](model.parameters())
    guard = spikedoc.Guard(model, opt, data=loader(), run_dir=tmp_path, scaler=scaler, max_steps=bad + 2,
                           checkpoint_every=1000)  # fmt: skip
    for step, batch in guard:
        if step == bad and scaler is not None:
            batch = garbage(batch, model.cfg.vocab_size)
        loss = model(batch["input_ids"], labels=batch["labels"]).loss * batch.get("loss_weight", 1.0)
        guard.record(loss=loss)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if step == bad:
            if scaler is None:
                fill_grads_with_nan(model)
            grads = {n: p.grad for n, p in model.named_parameters()}
            before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()
        if step == bad:
            after = copy.deepcopy((model.state_dict(), opt.state_dict()))
            grads_after = {n: p.grad for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard, before, after, grads, grads_after


def _assert_identical(before, after) -> None:
    for name, tensor in before[0].items():
        assert torch.equal(tensor, after[0][name]), name
    assert before[1]["state"].keys() == after[1]["state"].keys()
    for key, state in before[1]["state"].items():
        for field, value in state.items():  # Adam's per-parameter `step` included
            other = after[1]["state"][key][field]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (key, field)
    assert before[1]["param_groups"] == after[1]["param_groups"]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_a_vetoed_step_leaves_parameters_and_every_optimizer_state_bit_identical(tmp_path, opt_name):
    guard, before, after, grads, grads_after = _train_with_a_bad_step(tmp_path, opt_name)
    assert [a["step"] for a in guard.actions if a["kind"] == "veto"] == [BAD]
    _assert_identical(before, after)
    assert all(grads_after[n] is g for n, g in grads.items())  # the loop's gradients are back after step()


@pytest.mark.parametrize("opt_name", ["adamw", "adam_fused"])
def test_a_veto_inside_a_grad_scalers_step_leaves_the_state_bit_identical(tmp_path, opt_name):
    # The fused Adam unscales inside its own step (the scaler hands it the scale): the veto still applies nothing.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    guard, before, after, _, _ = _train_with_a_bad_step(tmp_path, opt_name, bad=70, scaler=scaler)
    assert [a["step"] for a in guard.actions if a["kind"] == "veto"] == [70]
    _assert_identical(before, after)


def test_the_gate_leaves_the_optimizers_step_method_alone():
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    gate = StepGate(opt, lambda g: None)
    assert "step" not in opt.__dict__  # hooks, not a replaced method
    gate.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_a_scheduler_built_after_the_guard_counts_every_step_and_the_veto_still_applies_nothing(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    guard = spikedoc.Guard(model, opt, data=loader(), run_dir=tmp_path, max_steps=12, checkpoint_every=1000)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # wraps opt.step after the guard
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in guard:
            model(batch["input_ids"], labels=batch["labels"]).loss.backward()
            if step == 8:
                fill_grads_with_nan(model)
                before = copy.deepcopy((model.state_dict(), opt.state_dict()))
            opt.step()
            if step == 8:
                after = copy.deepcopy((model.state_dict(), opt.state_dict()))
            sched.step()
            opt.zero_grad(set_to_none=True)
    guard.close()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert guard.vetoes == 1 and sched.last_epoch == 12
    _assert_identical(before, after)


def test_an_accelerate_prepared_optimizer_is_vetoed_rolled_back_and_its_scheduler_counts_right(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(*build())  # LambdaLR: a 20-step warmup to 3e-3
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path, max_steps=60,
                           checkpoint_every=20)  # fmt: skip
    lrs: dict[int, list[float]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in guard:
            accelerator.backward(model(batch["input_ids"], labels=batch["labels"]).loss)
            if 30 <= step < 35 and not guard.rollbacks:
                fill_grads_with_nan(model)
            opt.step()  # Accelerate's step, which calls the inner optimizer's: the guard's hooks are there
            sched.step()
            opt.zero_grad()
            lrs.setdefault(step, []).append(opt.param_groups[0]["lr"])
    guard.close()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert guard.vetoes == 5 and [a["to_step"] for a in guard.actions if a["kind"] == "rollback"] == [20]
    assert sched.scheduler.last_epoch == 60  # restored to step 20's count by the rollback, then one per step
    assert lrs[40] == [pytest.approx(0.7 * 3e-3)] and lrs[19] == [pytest.approx(3e-3)]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not opt.optimizer._optimizer_step_pre_hooks and not opt.optimizer._optimizer_step_post_hooks  # all removed


def test_a_veto_inside_accelerates_grad_scaler_step_leaves_the_state_bit_identical(tmp_path):
    # Accelerate's fp16 step puts its own function on `optimizer.step` while its GradScaler steps: the hooks compose.
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)  # the state AcceleratedOptimizer reads
    model = make_model(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    opt = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), scaler=scaler)
    guard = spikedoc.Guard(model, opt, data=loader(), run_dir=tmp_path, scaler=scaler, max_steps=72,
                           checkpoint_every=1000)  # fmt: skip
    for step, batch in guard:
        if step == 70:
            batch = garbage(batch, model.cfg.vocab_size)
        loss = model(batch["input_ids"], labels=batch["labels"]).loss * batch.get("loss_weight", 1.0)
        guard.record(loss=loss)
        scaler.scale(loss).backward()
        if step == 70:
            before = copy.deepcopy((model.state_dict(), opt.optimizer.state_dict()))
        opt.step()  # Accelerate: scaler.step(inner optimizer) with its patched step, then scaler.update()
        if step == 70:
            after = copy.deepcopy((model.state_dict(), opt.optimizer.state_dict()))
            skipped_by_accelerate = opt.step_was_skipped
        opt.zero_grad()
    guard.close()
    assert [a["step"] for a in guard.actions if a["kind"] == "veto"] == [70]
    assert not skipped_by_accelerate  # to Accelerate the step ran (its scheduler goes on)
    _assert_identical(before, after)
