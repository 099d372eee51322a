"""The optimizer's second moments caught collapsing before the update: a veto, a rollback to the state before, a stop when it returns."""

from __future__ import annotations

import pytest
import torch

import spikedoc
from spikedoc.guard.moments import MARGIN, SecondMoments
from tests.common.guarded import build, run_guarded
from tests.common.models import char_text, make_model

OPTIMIZERS = {
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.95)), "exp_avg_sq", 0.95),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9), "square_avg", 0.9),
    "adadelta": (lambda p: torch.optim.Adadelta(p, lr=1.0, rho=0.8), "square_avg", 0.8),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=1e-3, betas=(0.9, 0.97)), "exp_inf", 0.97),
}


def _stepped(name: str, steps: int = 3):
    """A tiny transformer and its optimizer after `steps` real updates on text, and the moments measured each step."""
    model = make_model(1)
    opt = OPTIMIZERS[name][0](model.parameters())
    ids = char_text().ids
    moments = SecondMoments()
    for s in range(steps):
        x = torch.stack([ids[i : i + 16] for i in range(s * 40, s * 40 + 160, 40)])  # (4, 16)
        model(x, labels=x.roll(-1, dims=1)).loss.backward()
        moments.calls += 1
        moments.measure(opt)
        moments.accept()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return model, opt, moments


def _state(opt: torch.optim.Optimizer, key: str) -> list[torch.Tensor]:
    return [opt.state[p][key] for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_update_on_zero_gradients_shrinks_the_state_by_its_decay_and_is_no_collapse(name):
    model, opt, moments = _stepped(name)
    key, decay = OPTIMIZERS[name][1:]
    before = [v.norm() for v in _state(opt, key)]
    moments.calls += 1
    assert int(moments.measure(opt)) == 0
    moments.accept()
    opt.step()  # every gradient zero: the state shrinks by exactly its decay
    ratios = torch.stack([v.norm() / b for v, b in zip(_state(opt, key), before) if b > 0])
    assert torch.allclose(ratios, torch.full_like(ratios, decay), rtol=1e-5)
    moments.calls += 1
    assert int(moments.measure(opt)) == 0


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_count_is_the_tensors_whose_norm_fell_under_the_decay_times_the_last(name):
    model, opt, moments = _stepped(name)
    key, decay = OPTIMIZERS[name][1:]
    state = _state(opt, key)
    before = [v.norm() for v in state]
    scale = [0.0, 0.5 * decay, decay * (1 + MARGIN), 1.0, 3.0] * len(state)
    with torch.no_grad():
        for v, s in zip(state, scale):
            v.mul_(s)
    moments.calls += 1
    counted = int(moments.measure(opt))
    # Brute force: each tensor's norm now against decay x its norm one step ago, less the rounding allowance.
    expected = sum(bool(v.norm() < decay * (1 - MARGIN) * b) and bool(b > 0) for v, b in zip(state, before))
    assert counted == expected and expected >= 2 * (len(state) // 5)


def test_the_collapsed_tensors_are_named_with_their_ratio_to_the_last_norm():
    model, opt, moments = _stepped("adam")
    names = {id(p): n for n, p in model.named_parameters()}
    first = next(p for p in model.parameters())
    moments.calls += 1
    moments.measure(opt)
    moments.accept()  # the baseline: the state as it is now
    with torch.no_grad():
        opt.state[first]["exp_avg_sq"].mul_(0.25)
    moments.calls += 1
    assert int(moments.measure(opt)) == 1
    found = moments.collapsed(names)
    assert found["tensors"] == [f"{names[id(first)]}.exp_avg_sq"] and found["collapsed"] == 1
    assert found["ratio_min"] == pytest.approx(0.25, rel=1e-5)


def _zero_state(key: str, at: int, *, every_pass: bool = False):
    """An `after_backward`: the optimizer's `key` zeroed before the update at step `at` (first pass, or every pass)."""

    def after_backward(step: int, guard) -> None:
        if step == at and (every_pass or not guard.rollbacks):
            for state in guard.optimizer.state.values():
                state[key].zero_()

    return after_backward


def _parts(name: str):
    model, _, _ = build(seed=2)
    opt = OPTIMIZERS[name][0](model.parameters())
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_a_zeroed_rmsprop_state_is_vetoed_before_its_update_and_rolled_back_with_nothing_else_changed(tmp_path):
    # Step 15: before the loss band is warm; the bound needs no history.
    guard, _ = run_guarded(tmp_path, steps=40, parts=_parts("rmsprop"), checkpoint_every=10,
                           after_backward=_zero_state("square_avg", 15))  # fmt: skip
    veto, rollback = [a for a in guard.actions if a["kind"] in ("veto", "rollback")]
    assert veto["step"] == 15 and veto["reasons"] == ["optimizer_state_collapsed"]
    assert veto["optimizer_state"]["collapsed"] == veto["optimizer_state"]["of"] and veto["optimizer_state"]["ratio_min"] == 0
    assert rollback["cause"] == "optimizer_state" and rollback["to_step"] == 10 and rollback["from_step"] == 16
    assert rollback["lr_scale"] == 1.0 and rollback["clip"] == rollback["clip_before"] and not rollback["skipped_positions"]
    assert guard.step == 40 and guard.vetoes == 1


def test_an_adam_collapse_that_returns_stops_as_recurring_after_one_rollback(tmp_path):
    with pytest.raises(spikedoc.GuardStopped, match="second moments collapsed again at step 33") as stopped:
        run_guarded(tmp_path, steps=60, parts=_parts("adam"), checkpoint_every=20,
                    after_backward=_zero_state("exp_avg_sq", 33, every_pass=True))  # fmt: skip
    diagnosis = stopped.value.diagnosis
    assert diagnosis["reason"] == "recurring" and [a["to_step"] for a in diagnosis["actions"]] == [20]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_clean_run_with_each_optimizer_has_no_veto_and_no_rollback(tmp_path, name):
    guard, _ = run_guarded(tmp_path, steps=60, parts=_parts(name), checkpoint_every=20)
    assert guard.vetoes == 0 and guard.rollbacks == 0


def test_a_rollback_to_a_checkpoint_with_smaller_moments_is_not_taken_for_a_collapse(tmp_path):
    # AdamW's exp_avg_sq (beta2 0.999) still grows at step 24: the checkpoint of step 20 holds moments
    # well under beta2 times those of step 24, which the restored state is never compared with.
    def request(step: int, guard) -> None:
        if step == 24 and not guard.rollbacks:
            guard.request_rollback()

    guard, _ = run_guarded(tmp_path, steps=40, checkpoint_every=10, after_backward=request)
    assert [a["to_step"] for a in guard.actions if a["kind"] == "rollback"] == [20] and guard.vetoes == 0
