"""Optimizer state, random-byte batches and a resume that restarts the schedule, on real tiny runs
(the exam's trainer) at seeds, sizes, lengths and steps the rules were not set on: the exam's
calibration half uses even seeds below 120 and 120-step runs."""

from __future__ import annotations

import pandas as pd
import pytest

import spikedoc
from bench._exam_design import labels
from bench._exam_train import Fault, Setup, _Loop, train
from spikedoc.analysis.change_points import state_jumps
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.schedule import restart_path, restarted_at_resume
from spikedoc.demo.training import _deterministic


def _diagnose(tmp_path, setup: Setup, fault: Fault):
    train(setup, fault, tmp_path / "run", tmp_path / "ckpt")
    return spikedoc.analyze(tmp_path / "run")


def _near(diagnosis, step: int, after: int = 3):
    return [i for i in diagnosis.incidents if step - 2 <= i.onset_step <= step + after]


@pytest.mark.parametrize(("setup", "step"), [
    (Setup(seed=1001, steps=100, optimizer="sgd", d_model=24, n_layer=2, batch=16, warmup=8), 61),
    (Setup(seed=1203, steps=90, optimizer="sgd", d_model=40, n_layer=1, batch=8, warmup=10, clip=1.0), 47),
])
def test_momentum_blown_up_between_steps_is_the_optimizer_state(tmp_path, setup, step):
    found = _near(_diagnose(tmp_path, setup, Fault(family="optimizer_state", kind="scale_m", step=step)), step)
    assert found, "the momentum x100 made no incident"
    assert found[0].cause == "optimizer_state", found[0].evidence
    # The momentum grew by far more than a gradient can add in one step: written from outside the optimizer.
    assert any("momentum of" in e and "written from outside the optimizer" in e for e in found[0].evidence)


def test_a_batch_of_random_bytes_is_a_bad_batch_by_its_token_diversity(tmp_path):
    setup = Setup(seed=1005, steps=100, optimizer="adamw", d_model=40, n_layer=2, batch=8, warmup=10)
    found = _near(_diagnose(tmp_path, setup, Fault(family="bad_batch", kind="random", step=63)), 63)
    assert found and found[0].cause == "bad_batch", [i.evidence for i in found]
    assert any("high-entropy input" in e for e in found[0].evidence)


def test_a_resume_that_restarts_the_schedule_is_reported_with_the_lr_it_went_back_to(tmp_path):
    setup = Setup(seed=1007, steps=100, optimizer="sgd", d_model=24, n_layer=2, batch=8, warmup=8)
    diagnosis = _diagnose(tmp_path, setup, Fault(family="lr_restart", kind="restart", step=71))
    jumps = [f for f in diagnosis.findings if f.id == "lr_discontinuity"]
    assert jumps and "the schedule started over" in jumps[0].message
    (jump,) = jumps[0].details["jumps"]
    assert (jump["step"], jump["direction"], jump["at_resume"]) == (71, "up", 1)
    assert jump["after"] == pytest.approx(setup.peak_lr)
    lr_at_resume = float(pd.read_parquet(tmp_path / "run" / "steps").query("step == 71 and segment == 1")["lr"].iloc[0])
    assert jump["resumed_lr"] == pytest.approx(lr_at_resume) and lr_at_resume < jump["before"]


def test_a_restarted_warmup_is_told_as_a_fall_at_the_resume_then_a_climb():
    # A 4-step warmup to 0.3 and a decay, resumed at step 10 with the warmup run again: the LR at
    # step 10 is 0.075, far below the 0.25 it left; it passes 0.25 only at step 13 and peaks there.
    lr = [0.075, 0.15, 0.225, 0.3, 0.3, 0.29, 0.28, 0.27, 0.26, 0.25, 0.075, 0.15, 0.225, 0.3, 0.3, 0.29, 0.28]
    (jump,) = restarted_at_resume(pd.DataFrame({"step": range(17), "lr": lr}), {10: 1})
    assert (jump["resumed_lr"], jump["peak_step"]) == (0.075, 13)
    assert restart_path(jump) == "fell from 0.25 to 0.075 at the resume, then climbed to 0.3 by step 13 (1.2x the LR it left)"


def test_a_resume_that_restores_the_schedule_is_no_restart():
    lr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1]
    assert restarted_at_resume(pd.DataFrame({"step": range(14), "lr": lr}), {8: 1}) == []


def test_a_constant_lr_resumed_is_no_restart():
    frame = pd.DataFrame({"step": range(14), "lr": [0.3] * 14})
    assert restarted_at_resume(frame, {8: 1}) == []


def test_a_restart_that_never_climbs_above_the_lr_it_left_is_a_downward_discontinuity():
    lr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
    (jump,) = restarted_at_resume(pd.DataFrame({"step": range(14), "lr": lr}), {8: 1})
    assert (jump["direction"], jump["after"], jump["before"]) == ("down", 0.1, 0.5)
    assert "until" not in jump


def test_a_restart_that_climbs_back_above_the_lr_it_left_is_upward_however_little():
    # A resume just past the peak: the warmup runs again and the decay restarts from a peak only 4%
    # above where it had got to: the LR runs above the one it left on steps 12 to 14 (and above the
    # run's own decay, which would have gone on falling from 0.48, longer still).
    lr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.49, 0.48, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.49, 0.48, 0.47]
    (jump,) = restarted_at_resume(pd.DataFrame({"step": range(17), "lr": lr}), {8: 1})
    assert (jump["direction"], jump["after"], jump["before"], jump["until"]) == ("up", 0.5, 0.48, 14)


@pytest.mark.parametrize(("setup", "kind", "step"), [
    (Setup(seed=1009, steps=100, optimizer="adamw", d_model=40, n_layer=2, batch=16, warmup=10), "zero_v", 58),
    (Setup(seed=1011, steps=110, optimizer="adam", d_model=24, n_layer=3, batch=8, warmup=20, clip=1.0), "scale_v", 77),
])
def test_an_update_jump_with_a_quiet_gradient_is_a_state_change_point(tmp_path, setup, kind, step):
    train(setup, Fault(family="optimizer_state", kind=kind, step=step), tmp_path / "run", tmp_path / "ckpt")
    steps = pd.read_parquet(tmp_path / "run" / "steps")
    assert state_jumps(steps.sort_values("step"), AnalysisConfig()) == [step]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lion"])
def test_a_clean_run_has_no_state_change_point(tmp_path, optimizer):
    setup = Setup(seed=1013, steps=100, optimizer=optimizer, d_model=32, n_layer=2, batch=16, warmup=10)
    train(setup, None, tmp_path / "run", tmp_path / "ckpt")
    steps = pd.read_parquet(tmp_path / "run" / "steps")
    assert state_jumps(steps.sort_values("step"), AnalysisConfig()) == []
    assert "optimizer_state_changed" not in {f.id for f in spikedoc.analyze(tmp_path / "run").findings}


@pytest.mark.parametrize(("setup", "kind", "step"), [
    (Setup(seed=1015, steps=100, optimizer="adamw", d_model=16, n_layer=2, batch=8, warmup=20, clip=1.0), "scale_v", 64),
    (Setup(seed=1017, steps=120, optimizer="adam", d_model=48, n_layer=1, batch=32, warmup=6), "zero_v", 88),
])
def test_a_state_change_is_an_optimizer_state_incident_or_else_a_finding(tmp_path, setup, kind, step):
    diagnosis = _diagnose(tmp_path, setup, Fault(family="optimizer_state", kind=kind, step=step))
    found = _near(diagnosis, step)
    changed = [f.details["steps"] for f in diagnosis.findings if f.id == "optimizer_state_changed"]
    if found:
        assert found[0].cause == "optimizer_state" and not changed, found[0].evidence
    else:
        assert changed == [[step]]


# ------------------------------------------------------------------------------------ a resume and its schedule


class _ResumedCorrectly(_Loop):
    """The exam's loop, stopped and resumed at `at` as a new segment with everything restored (the
    schedule goes on from where it was): a resume done right."""

    def __init__(self, setup: Setup, run_dir, ckpt_dir, *, at: int) -> None:
        self.at = at
        super().__init__(setup, None, run_dir, ckpt_dir)

    def _between_steps(self, step: int) -> None:
        if step == self.at:
            self.monitor.close()
            self.monitor = self._watch(start_step=step)


@pytest.mark.parametrize(("setup", "step"), [
    (Setup(seed=1035, steps=100, optimizer="sgd", d_model=40, n_layer=2, batch=8, warmup=6, clip=0.5, lr_scale=2.0), 38),
    (Setup(seed=1037, steps=110, optimizer="sgd", d_model=24, n_layer=2, batch=8, warmup=20, clip=1.0, lr_scale=1.5), 42),
])
def test_a_resume_that_restarts_the_schedule_and_raises_the_loss_is_lr_schedule(tmp_path, setup, step):
    fault = Fault(family="lr_restart", kind="restart", step=step)
    twin = train(setup, None, tmp_path / "twin", tmp_path / "twin-ckpt")
    record = train(setup, fault, tmp_path / "run", tmp_path / "ckpt")
    assert labels(setup, fault, record, twin)["band"] != "none"  # the case this test is about: the loss felt it
    found = _near(spikedoc.analyze(tmp_path / "run"), step)
    assert found, "the restarted schedule made no incident"
    assert found[0].cause == "lr_schedule", found[0].evidence
    assert any("the schedule started again from step 0" in e for e in found[0].evidence)


def test_a_resume_that_continues_the_schedule_gets_no_schedule_finding(tmp_path):
    setup = Setup(seed=1023, steps=100, optimizer="sgd", d_model=24, n_layer=3, batch=8, warmup=6, clip=0.5, lr_scale=1.5)
    (tmp_path / "ckpt").mkdir()
    with _deterministic(setup.seed):
        loop = _ResumedCorrectly(setup, tmp_path / "run", tmp_path / "ckpt", at=66)
        loop.run()
    diagnosis = spikedoc.analyze(tmp_path / "run")
    assert [r["step"] for r in diagnosis.summary["resumes"]] == [66]  # a resume was recorded
    assert "lr_discontinuity" not in {f.id for f in diagnosis.findings}
    assert not [i for i in diagnosis.incidents if i.cause == "lr_schedule"]


@pytest.mark.parametrize(("setup", "step"), [
    (Setup(seed=1051, steps=100, optimizer="sgd", d_model=40, n_layer=3, batch=16, warmup=10), 55),
    (Setup(seed=1053, steps=110, optimizer="sgd", d_model=24, n_layer=2, batch=16, warmup=20, lr_scale=1.5), 40),
])
def test_a_resume_whose_lr_throws_the_loss_back_is_lr_schedule_not_a_state_never_loaded(tmp_path, setup, step):
    # Everything restored, the LR x16 from the resume on: the loss of the resume's first step (before
    # its update) is still the trained model's; the next steps' go most of the way back to the start.
    train(setup, Fault(family="lr_restart", kind="rescaled", step=step, factor=16.0), tmp_path / "run", tmp_path / "ckpt")
    loss = pd.read_parquet(tmp_path / "run" / "steps").sort_values("step").set_index("step")["loss"]
    initial, before = loss.iloc[:5].median(), loss.loc[step - 3 : step - 1].median()
    assert (loss.loc[step : step + 2].median() - before) / (initial - before) >= 0.5  # the case this test is about
    diagnosis = spikedoc.analyze(tmp_path / "run")
    assert [r["state_reset"] for r in diagnosis.summary["resumes"]] == [False]
    found = _near(diagnosis, step)
    assert found and found[0].cause == "lr_schedule", [(i.onset_step, i.cause) for i in diagnosis.incidents]
    assert "state_reset" not in {i.cause for i in diagnosis.incidents}
