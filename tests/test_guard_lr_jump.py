"""An unscheduled upward LR jump opens an incident at its step; the schedules people use never do.

Real tiny loops on real text: the guard sees the LR it applies each step, so an LR surge that
raises the loss slowly (no step out of the detector's band) is still followed, judged by the
recovery tracker and, when it left damage, rolled back to before the jump with the LR held there.
"""

from __future__ import annotations

import math

import pytest
import torch

import spikedoc
from spikedoc.analysis.recovery import RecoveryConfig
from spikedoc.guard.agree import StepValues
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Judge
from tests.common.models import char_text, make_model

STEPS, JUMP, SURGE, EVERY, LR = 200, 120, 12, 20, 3e-3


def get_batch(split: str = "train", batch_size: int = 32, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's sampler: random offsets from the global RNG (the split picks the text's half)."""
    ids = char_text().ids
    ids = ids[: len(ids) // 2] if split == "train" else ids[len(ids) // 2 :]
    ix = torch.randint(len(ids) - block - 1, (batch_size,))
    return torch.stack([ids[i : i + block] for i in ix]), torch.stack([ids[i + 1 : i + 1 + block] for i in ix])


def surge(step: int) -> float:
    """The LR multiplier of a resume with the wrong base LR: x30 for a dozen steps, after the warmup."""
    warmup = min(1.0, 0.01 + 0.99 * step / 20)
    return warmup * (30.0 if JUMP <= step < JUMP + SURGE else 1.0)


def warmup_cosine(step: int) -> float:
    """Linear warmup from 0.01x over 40 steps, then cosine decay to 0.1x."""
    if step < 40:
        return 0.01 + 0.99 * step / 40
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 40) / (STEPS - 40)))


def evaluate(model: torch.nn.Module) -> float:
    """Mean loss on fixed held-out windows (their own generator: the training draws are left alone)."""
    ids = char_text().ids[len(char_text().ids) // 2 :]
    gen = torch.Generator().manual_seed(123)
    ix = torch.randint(len(ids) - 33, (64,), generator=gen)
    x, y = torch.stack([ids[i : i + 32] for i in ix]), torch.stack([ids[i + 1 : i + 33] for i in ix])
    with torch.no_grad():
        return float(model(x, labels=y).loss)


def _train(tmp_path, *, lam=None, sched: str = "lambda", by_hand: bool = False, guarded: bool = True):
    """A drawing loop; the LR set by a scheduler (`lam` through LambdaLR, or SGDR) or by hand each step."""
    torch.manual_seed(0)
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = None
    if sched == "sgdr":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60, T_mult=1)
    elif not by_hand:
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    if not guarded:
        for it in range(STEPS):
            if by_hand:
                for group in opt.param_groups:
                    group["lr"] = LR * lam(it)
            x, y = get_batch()
            model(x, labels=y).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
        return None, evaluate(model)
    guard = spikedoc.Guard(model, opt, scheduler=scheduler, data=get_batch, run_dir=tmp_path, checkpoint_every=EVERY,
                           max_steps=STEPS)  # fmt: skip
    for it in guard.steps():
        if by_hand:
            for group in opt.param_groups:
                group["lr"] = LR * lam(it)
        x, y = guard.draw()
        loss = model(x, labels=y).loss
        guard.record(loss=loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    guard.close()
    return guard, evaluate(model)


def _incidents(run_dir) -> list[dict]:
    events = spikedoc.load(run_dir).events
    return events.loc[events["kind"].isin(["rollback", "veto", "data_skip", "stop"])].to_dict("records")


@pytest.fixture(scope="module")
def clean_eval(tmp_path_factory) -> float:
    return _train(tmp_path_factory.mktemp("clean"), lam=lambda s: min(1.0, 0.01 + 0.99 * s / 20))[1]


@pytest.mark.parametrize("by_hand", [False, True], ids=["scheduler", "hand_set"])
def test_an_lr_surge_rolls_back_to_before_the_jump_with_the_lr_held_and_heals(tmp_path, clean_eval, by_hand):
    _, unguarded = _train(tmp_path / "unguarded", lam=surge, by_hand=by_hand, guarded=False)
    guard, healed = _train(tmp_path / "guarded", lam=surge, by_hand=by_hand)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["cause"] == "lr_schedule" and rollback["onset_step"] == JUMP
    assert rollback["to_step"] <= JUMP and rollback["lr_held"]["from_step"] == JUMP
    assert rollback["lr_held"]["at"] == pytest.approx([LR * surge(JUMP - 1)])
    steps = spikedoc.load(tmp_path / "guarded").steps
    replay = steps.loc[steps["segment"] == steps["segment"].max()].set_index("step")["lr"]
    assert replay.loc[JUMP : JUMP + SURGE - 1].max() <= LR * surge(JUMP - 1) * (1 + 1e-6)  # the surge never applied
    assert unguarded > clean_eval * 1.03  # the surge left damage the guard had to heal
    assert healed < clean_eval * 1.03


def test_a_clean_run_with_linear_warmup_from_a_hundredth_and_cosine_decay_opens_no_incident(tmp_path):
    guard, _ = _train(tmp_path, lam=warmup_cosine)
    assert guard.actions == []


def test_a_declared_warm_restart_schedule_opens_no_incident(tmp_path):
    guard, _ = _train(tmp_path, sched="sgdr")
    steps = spikedoc.load(tmp_path).steps.set_index("step")["lr"]
    assert (steps.loc[60] / steps.loc[59]) > 100  # the restarts are jumps by any factor
    assert guard.actions == []


def _judge_with_lrs(lrs_of, steps: int = 200) -> list[int]:
    """Steps at which an incident is open, the judge fed a flat loss and each step's LR."""
    judge = Judge(GuardConfig())
    open_at = []
    for s in range(steps):
        judge.record(judge.judge(s, StepValues(3.0 + 0.01 * ((s * 7) % 11 - 5), 0.5, 0, 0)), lrs=lrs_of(s))
        if judge.incident is not None:
            open_at.append(s)
    return open_at


def test_the_guards_own_undo_of_a_rollbacks_factor_opens_no_incident():
    assert _judge_with_lrs(lambda s: [1e-3 * (0.7 if s < 120 else 1.0)]) == []


def test_a_jump_opens_the_incident_at_its_step_and_its_own_update_is_the_precursor():
    judge = Judge(GuardConfig())
    for s in range(121):
        judge.record(judge.judge(s, StepValues(3.0 + 0.01 * ((s * 7) % 11 - 5), 0.5, 0, 0)), lrs=[3e-2 if s == 120 else 1e-3])
    assert (judge.incident.onset_step, judge.incident.precursor_step) == (120, 120)
    restored = Judge(GuardConfig())
    restored.load_state_dict(judge.state_dict())
    assert restored.incident.lr_jump == judge.incident.lr_jump and judge.incident.lr_jump["lrs_before"] == [1e-3]


def test_a_jump_before_the_band_is_warm_opens_no_incident():
    assert _judge_with_lrs(lambda s: [1e-3 * (10.0 if s >= 20 else 1.0)], steps=60) == []


def _aftermath(lrs_of) -> dict:
    """A loss flagged at step 120 (7 to 10 sigmas: not vetoed) that comes back slowly (+0.15 for 8
    steps, then on its level): the step the recovery tracker first calls it `recovered`, with the
    shift test's steps then, and the step the incident closes."""
    judge = Judge(GuardConfig())
    seen: dict = {"decisions": []}
    tracker = None
    for s in range(200):
        excess = 0.4 if s == 120 else 0.15 if 120 < s < 129 else 0.0
        loss = 3.0 + 0.01 * ((s * 7) % 11 - 5) + excess
        seen["decisions"].append(judge.record(judge.judge(s, StepValues(loss, 0.5, 0, 0)), lrs=lrs_of(s)))
        if judge.incident is not None:
            tracker = judge.incident.tracker
        if tracker is not None and tracker.last is not None and tracker.last.verdict == "recovered":
            seen.setdefault("recovered", (s, tracker.shift_steps))
        if tracker is not None and judge.incident is None:
            seen["closed"] = s
            break
    return seen


def test_an_lr_jumps_incident_called_recovered_stays_open_until_the_shift_test_holds_hold_steps():
    hold = RecoveryConfig().hold_steps
    seen = _aftermath(lambda s: [3e-2 if 120 <= s < 125 else 1e-3])
    recovered_at, shift_steps = seen["recovered"]
    assert shift_steps < hold  # back on the trajectory with too few steps to test a lasting shift
    assert seen["closed"] == recovered_at + hold - shift_steps  # closed once the test has hold_steps
    assert all(d is None for d in seen["decisions"])  # no lasting shift: recovered, no rollback


def test_a_loss_flags_incident_closes_at_its_first_recovered_verdict():
    seen = _aftermath(lambda s: [1e-3])  # the same losses without an LR jump
    assert seen["closed"] == seen["recovered"][0]


def test_the_replay_with_the_lr_held_before_the_jump_names_the_schedule(tmp_path):
    from spikedoc.analysis.guard_actions import guard_actions

    guard, _ = _train(tmp_path, lam=surge)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["skipped_positions"] == []  # only the LR changed: the replay tests the schedule alone
    confirmed = next(a for a in guard.actions if a["kind"] == "replay" and a["replay"] == "lr_before_jump")
    assert confirmed["found"] == "schedule" and confirmed["from_step"] == rollback["from_step"]
    assert confirmed["step"] >= rollback["from_step"] and confirmed["jump_step"] == JUMP
    [recorded] = [a for a in guard_actions(spikedoc.load(tmp_path).events) if a["kind"] == "rollback"]
    assert recorded["cause"]["status"] == "confirmed" and recorded["cause"]["found"] == "schedule"
