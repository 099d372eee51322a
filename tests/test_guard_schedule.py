"""After a rollback the whole LR schedule is the original times lr_factor, for every common scheduler."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console
from torch.optim import lr_scheduler as lrs

import spikedoc
from spikedoc.guard.schedule import scale_schedule
from spikedoc.report.terminal import render

STEPS = 80
ROLLBACK_AT = 35


def _warmup_cosine(step: int) -> float:
    if step < 10:
        return (step + 1) / 10
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / (STEPS - 10)))


def _wsd(step: int) -> float:  # warmup, stable, then a linear decay over the last 20%
    if step < 10:
        return (step + 1) / 10
    return 1.0 if step < 64 else max(0.0, (STEPS - step) / (STEPS - 64))


def _hf_cosine(opt):
    transformers = pytest.importorskip("transformers")
    return transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=STEPS)


SCHEDULERS = {
    "lambda_warmup_cosine": lambda opt: lrs.LambdaLR(opt, _warmup_cosine),
    "cosine_annealing": lambda opt: lrs.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-3),
    "sequential": lambda opt: lrs.SequentialLR(
        opt, [lrs.LinearLR(opt, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(opt, T_max=STEPS - 10, eta_min=1e-4)],
        milestones=[10]),
    "one_cycle": lambda opt: lrs.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=STEPS + 1),
    "hf_cosine_with_warmup": _hf_cosine,
    "linear_decay": lambda opt: lrs.LambdaLR(opt, lambda s: min((s + 1) / 10, max(0.0, (STEPS - s) / (STEPS - 10)))),
    "constant_with_warmup": lambda opt: lrs.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10)),
    "inverse_sqrt": lambda opt: lrs.LambdaLR(opt, lambda s: min((s + 1) ** -0.5, (s + 1) * 10**-1.5) * 10**0.5),
    "warmup_stable_decay": lambda opt: lrs.LambdaLR(opt, _wsd),
    "cosine_warm_restarts": lambda opt: lrs.CosineAnnealingWarmRestarts(opt, T_0=15, T_mult=2, eta_min=1e-4),
    "step_decay": lambda opt: lrs.StepLR(opt, step_size=20, gamma=0.5),
    "exponential": lambda opt: lrs.ExponentialLR(opt, gamma=0.98),
    "polynomial": lambda opt: lrs.PolynomialLR(opt, total_iters=STEPS, power=2.0),
}  # fmt: skip


def _parts(name: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.05},
                             {"params": model[2].parameters(), "lr": 0.02}])  # fmt: skip
    return model, opt, SCHEDULERS[name](opt)


def _reference(name: str) -> list[list[float]]:
    """Each step's LR per group when the schedule runs undisturbed."""
    _, opt, sched = _parts(name)
    out = []
    for _ in range(STEPS):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def _train(tmp_path, name: str, *, rollback_at: int = ROLLBACK_AT, parts=None, **options):
    model, opt, sched = parts or _parts(name)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 4, generator=gen) for _ in range(200)]
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=data, run_dir=tmp_path, checkpoint_every=10,
                           max_steps=STEPS, **options)  # fmt: skip
    seen: dict[int, list[list[float]]] = {}
    for step, x in guard:
        seen.setdefault(step, []).append([g["lr"] for g in opt.param_groups])
        loss = model(x).pow(2).mean()
        guard.record(loss=loss)
        loss.backward()
        if step == rollback_at and guard.rollbacks == 0:
            guard.request_rollback()
        opt.step()
        sched.step()
        opt.zero_grad()
    guard.close()
    return guard, seen


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_after_a_rollback_every_later_lr_is_lr_factor_times_the_original(tmp_path, name):
    reference = _reference(name)
    guard, seen = _train(tmp_path, name)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    back = rollback["to_step"]
    assert rollback["reason"] == "requested" and back <= ROLLBACK_AT + 1 and back % 10 == 0
    for step in range(STEPS):
        passes = seen[step]
        if step < back:
            assert passes == [pytest.approx(reference[step], rel=1e-12, abs=0)]
        else:
            scaled = [0.7 * lr for lr in reference[step]]
            assert passes[-1] == pytest.approx(scaled, rel=1e-9, abs=0), step
            if step <= ROLLBACK_AT:  # seen before the rollback too, at the original LR
                assert passes[0] == pytest.approx(reference[step], rel=1e-12, abs=0)


def test_scaling_a_schedule_twice_multiplies_the_factors():
    _, opt, sched = _parts("cosine_annealing")
    for _ in range(5):
        opt.step()
        sched.step()
    scale_schedule(opt, sched, 0.7)
    scale_schedule(opt, sched, 0.5)
    reference = _reference("cosine_annealing")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.35 * lr for lr in reference[5]], rel=1e-12)
    assert sched.eta_min == pytest.approx(0.35e-3)


def _jump_at_40(step: int) -> float:
    return 1.0 if step < 40 else 10.0  # a schedule restored with the wrong base LR


def test_a_rollback_for_an_lr_jump_holds_the_lr_at_its_level_before_the_jump(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = lrs.LambdaLR(opt, _jump_at_40)
    guard, seen = _train(tmp_path, "", rollback_at=45, parts=(model, opt, sched))
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["cause"] == "lr_schedule" and rollback["to_step"] == 40
    assert rollback["lr_held"]["from_step"] == 40 and rollback["lr_held"]["at"] == [pytest.approx(0.01)]
    assert guard.lr_scale == 1.0 and guard.clip == 1.0  # the schedule was at fault, not the run's settings
    steps = spikedoc.load(tmp_path).steps
    replay = steps.loc[steps["segment"] == 1].set_index("step")["lr"]
    assert replay.index.min() == 40 and replay.to_numpy() == pytest.approx([0.01] * 40, rel=1e-6)  # as applied
    assert seen[60][-1] == [pytest.approx(0.1)]  # while the schedule itself is left as it is
    diagnosis = spikedoc.analyze(tmp_path)
    held = [e for e in diagnosis.guard_actions if e["kind"] == "rollback"][0]
    assert held["detail"]["lr_held"]["jump"]["factor"] == pytest.approx(10.0)
    console = Console(record=True, width=200)
    render(diagnosis, console)
    assert "(requested, cause lr_schedule): LR held at 0.01 from step 40" in console.export_text()


def _decaying(step: int) -> float:
    return min(1.0, (step + 1) / 10) * 0.97 ** max(0, step - 10)  # warmup, then a steep exponential decay


@pytest.mark.parametrize(("nan_at", "checkpoint_every"), [(60, 20), (81, 25), (55, 30)])
def test_a_replay_on_the_checkpoint_carries_its_lr_and_is_no_lr_discontinuity(tmp_path, nan_at, checkpoint_every):
    # A NaN written into a weight: the guard vetoes, then replays the last healthy batches on the good
    # checkpoint, whose LR (steps earlier on a decaying schedule) its rows record. That is the guard's
    # probe, not a schedule that jumped.
    from tests.common.guarded import build, run_guarded

    model, opt, _ = build()
    parts = (model, opt, lrs.LambdaLR(opt, _decaying))

    def corrupt(guard, step, batch):
        if step == nan_at and guard.rollbacks == 0:
            with torch.no_grad():
                guard.model.tok.weight[3, 5] = math.nan

    guard, _ = run_guarded(tmp_path, steps=100, parts=parts, checkpoint_every=checkpoint_every, on_step=corrupt)
    assert any(a["kind"] == "replay" and a.get("on") == "checkpoint" for a in guard.actions), guard.actions
    diagnosis = spikedoc.analyze(tmp_path)
    assert [f.details for f in diagnosis.findings if f.id == "lr_discontinuity"] == []
