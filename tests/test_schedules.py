"""Healthy tiny runs under every common LR schedule: analyze finds no incident and no LR discontinuity."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch.optim import lr_scheduler as sched
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app
from tests.common.models import char_text, make_model

STEPS = 80
WARMUP = 10
LR = 3e-3


def _warmup_cosine(step: int) -> float:  # transformers' get_cosine_schedule_with_warmup
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def _warmup_linear(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
    return (step + 1) / WARMUP if step < WARMUP else max(0.0, (STEPS - step) / (STEPS - WARMUP))


def _warmup_constant(step: int) -> float:  # transformers' get_constant_schedule_with_warmup
    return min(1.0, (step + 1) / WARMUP)


def _noam(step: int) -> float:  # "Attention is all you need", eq. 3, normalised to 1 at the peak
    s = step + 1
    return min(s**-0.5, s * WARMUP**-1.5) * WARMUP**0.5


def _wsd(step: int) -> float:  # warmup, stable, then a linear decay over the last 20% (MiniCPM's WSD)
    decay = int(0.8 * STEPS)
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 1.0 if step < decay else max(0.0, (STEPS - step) / (STEPS - decay))


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "warmup_cosine_lambda": lambda opt: sched.LambdaLR(opt, _warmup_cosine),
    "warmup_cosine_sequential": lambda opt: sched.SequentialLR(
        opt, [sched.LinearLR(opt, start_factor=0.1, total_iters=WARMUP), sched.CosineAnnealingLR(opt, T_max=STEPS - WARMUP)],
        milestones=[WARMUP]),
    "linear_decay": lambda opt: sched.LambdaLR(opt, _warmup_linear),
    "constant_with_warmup": lambda opt: sched.LambdaLR(opt, _warmup_constant),
    "inverse_sqrt": lambda opt: sched.LambdaLR(opt, _noam),
    "cosine_warm_restarts": lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=30),
    "cosine_warm_restarts_tmult": lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=20, T_mult=2, eta_min=1e-4),
    "warmup_stable_decay": lambda opt: sched.LambdaLR(opt, _wsd),
    "one_cycle": lambda opt: sched.OneCycleLR(opt, max_lr=LR, total_steps=STEPS),
    "step_decay": lambda opt: sched.StepLR(opt, step_size=40, gamma=0.3),
    "exponential": lambda opt: sched.ExponentialLR(opt, gamma=0.98),
    "polynomial": lambda opt: sched.PolynomialLR(opt, total_iters=STEPS, power=2.0),
}


def _layerwise_groups(model: torch.nn.Module, decay: float = 0.8) -> list[dict]:
    # Layer-wise LR decay: the head at the full LR, each block below it `decay` times less.
    depth = {"tok": 3, "pos": 3, "blocks.0": 2, "blocks.1": 1}
    groups: dict[int, list] = {}
    for name, p in model.named_parameters():
        d = next((v for k, v in depth.items() if name.startswith(k)), 0)
        groups.setdefault(d, []).append(p)
    return [{"params": ps, "lr": LR * decay**d} for d, ps in sorted(groups.items())]


def _train(run_dir, make_schedule, *, groups=None, restart_at: int | None = None, jump_at: int | None = None) -> None:
    """A tiny healthy run; `restart_at`: resume there with the schedule rebuilt from step 0 (a bug);
    `jump_at`: multiply the LR by 10 from there (a bug)."""
    model = make_model(seed=11)
    opt = torch.optim.AdamW(groups(model) if groups else model.parameters(), lr=LR, weight_decay=0.1)
    schedule = make_schedule(opt)
    text = char_text()
    monitor = spikedoc.watch(model, opt, run_dir=run_dir, scheduler=schedule)
    for step in range(STEPS):
        if step == restart_at:  # a resume whose scheduler state was not restored
            monitor.close()
            for group in opt.param_groups:
                group.pop("initial_lr", None)
                group["lr"] = LR
            schedule = make_schedule(opt)
            monitor = spikedoc.watch(model, opt, run_dir=run_dir, scheduler=schedule, start_step=step)
        if step == jump_at:
            for group in opt.param_groups:
                group["lr"] *= 10
            schedule.base_lrs = [b * 10 for b in schedule.base_lrs]
        ids, labels = text.batch(step)
        model(ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
    monitor.close()


def _lr_findings(diagnosis) -> list:
    return [f for f in diagnosis.findings if f.id == "lr_discontinuity"]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_healthy_run_under_the_schedule_has_no_incident_and_no_lr_discontinuity(tmp_path, name):
    _train(tmp_path, SCHEDULES[name])
    diagnosis = spikedoc.analyze(tmp_path)
    assert diagnosis.incidents == [], [(i.onset_step, i.kind, i.cause) for i in diagnosis.incidents]
    assert _lr_findings(diagnosis) == []
    assert spikedoc.load(tmp_path).meta["scheduler"][0]["class"] == type(SCHEDULES[name](
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR))).__name__


def test_layerwise_lr_decay_groups_have_no_incident_and_no_lr_discontinuity(tmp_path):
    _train(tmp_path, SCHEDULES["warmup_cosine_lambda"], groups=_layerwise_groups)
    diagnosis = spikedoc.analyze(tmp_path)
    steps = spikedoc.load(tmp_path).steps
    assert {"lr", "lr_1", "lr_2", "lr_3"} <= set(steps.columns)
    assert diagnosis.incidents == [] and _lr_findings(diagnosis) == []


def test_warm_restarts_are_recognised_from_the_lr_series_alone(tmp_path):
    # Without scheduler=: two restarts back to the peak, one period apart, are the schedule's.
    model = make_model(seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = sched.CosineAnnealingWarmRestarts(opt, T_0=30)
    text = char_text()
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        for step in range(STEPS):
            ids, labels = text.batch(step)
            model(ids, labels=labels).loss.backward()
            opt.step(), schedule.step(), opt.zero_grad()
    assert _lr_findings(spikedoc.analyze(tmp_path)) == []


def test_a_resume_that_restarted_the_schedule_is_still_a_discontinuity(tmp_path):
    _train(tmp_path, SCHEDULES["cosine_warm_restarts"], restart_at=50)
    jumps = _lr_findings(spikedoc.analyze(tmp_path))
    assert [j["step"] for j in jumps[0].details["jumps"]] == [50]


def test_an_lr_jumped_tenfold_in_a_restarting_schedule_is_still_a_discontinuity(tmp_path):
    _train(tmp_path, SCHEDULES["cosine_warm_restarts"], jump_at=35)
    jumps = _lr_findings(spikedoc.analyze(tmp_path))
    assert 35 in [j["step"] for j in jumps[0].details["jumps"]]


def _resume_without_scheduler_state(run_dir, make_schedule, *, resume_at: int, scheduler_first: bool,
                                    lost: int = 0) -> None:
    """A tiny run saved at `resume_at` and resumed into the same run dir by a second job that loads the
    model and the optimizer but not the scheduler (a bug): its schedule starts over. `scheduler_first`:
    the job builds its scheduler before loading the optimizer's state (the usual script order), so the
    first resumed step runs at the LR the optimizer's state dict carried. `lost`: the first job's last
    `lost` steps are trained but their rows never written, as a kill before the next flush leaves them."""
    text = char_text()

    def job(first: int, last: int, saved: dict | None) -> dict:
        model = make_model(seed=11)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        schedule = make_schedule(opt) if scheduler_first or saved is None else None
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            schedule = schedule or make_schedule(opt)
        monitor = spikedoc.watch(model, opt, run_dir=run_dir, scheduler=schedule)
        for step in range(first, last):
            if saved is None and step == last - lost:
                monitor.close()  # the rows from here on never reach the disk
            ids, labels = text.batch(step)
            model(ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), schedule.step(), opt.zero_grad()
        monitor.close()
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    job(resume_at, STEPS, job(0, resume_at, None))


@pytest.mark.parametrize("scheduler_first", [True, False], ids=["scheduler_built_first", "scheduler_built_after_load"])
@pytest.mark.parametrize(("name", "resume_at"), [("warmup_cosine_lambda", 40), ("linear_decay", 33)])
def test_a_resumed_job_whose_schedule_started_over_is_a_discontinuity_at_its_resume(tmp_path, name, resume_at,
                                                                                    scheduler_first):
    _resume_without_scheduler_state(tmp_path, SCHEDULES[name], resume_at=resume_at, scheduler_first=scheduler_first)
    jumps = _lr_findings(spikedoc.analyze(tmp_path))
    assert jumps, "a schedule that started over at the resume went unreported"
    assert "the schedule started over" in jumps[0].message
    assert [(j["step"], j["at_resume"]) for j in jumps[0].details["jumps"]] == [(resume_at, 1)]


def test_the_quiet_line_of_a_run_whose_schedule_restarted_names_the_warning(tmp_path):
    # Whatever the incidents say (often none: the restarted warmup is smooth), the line names the warning.
    _resume_without_scheduler_state(tmp_path, SCHEDULES["warmup_cosine_lambda"], resume_at=40, scheduler_first=True)
    result = CliRunner().invoke(app, ["analyze", str(tmp_path), "--quiet"])
    (line,) = result.output.splitlines()
    assert line.endswith("; 1 warning: lr_discontinuity"), line


@pytest.mark.parametrize(("name", "resume_at", "lost"), [("warmup_cosine_lambda", 45, 15), ("linear_decay", 38, 9)])
def test_a_restart_after_rows_lost_to_a_kill_is_told_from_the_lr_the_resumed_job_started_at(
        tmp_path, name, resume_at, lost):
    # The killed job trained up to its checkpoint, but its last rows were never flushed: the restarted
    # schedule is told from the LR the resumed job started at (the checkpoint's), not the LR of the last
    # row written, and the steps without rows are named.
    _resume_without_scheduler_state(tmp_path, SCHEDULES[name], resume_at=resume_at, scheduler_first=True, lost=lost)
    run = spikedoc.load(tmp_path)
    assert [w for w in run.warnings if f"steps {resume_at - lost}..{resume_at - 1} (rank 0)" in w], run.warnings
    jumps = _lr_findings(spikedoc.analyze(tmp_path))
    assert jumps, "a schedule that started over at the resume went unreported"
    (jump,) = jumps[0].details["jumps"]
    assert jump["step"] == resume_at and jump["at_resume"] == 1
    checkpoint_lr = float(run.steps.loc[run.steps["step"] == resume_at, "lr"].iloc[0])
    assert jump["before"] == pytest.approx(checkpoint_lr)


def test_a_resume_from_the_last_written_step_warns_of_no_unwritten_steps(tmp_path):
    _resume_without_scheduler_state(tmp_path, SCHEDULES["warmup_cosine_lambda"], resume_at=40, scheduler_first=True)
    assert not [w for w in spikedoc.load(tmp_path).warnings if "never written" in w]
