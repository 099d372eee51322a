"""Specification of the LR-jump level test and of grad-norm rises during the LR warmup."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spikedoc.analysis import analyze
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.detect import DetectorConfig, find_incidents
from spikedoc.analysis.lr_response import level_sigma, lr_jump_incidents, window_level
from tests.common.planted import healthy_steps, write_run

J = 400  # step of the LR jump


def _jump_lr(steps: pd.DataFrame, factor: float = 10.0) -> None:
    steps.loc[steps["step"] >= J, "lr"] *= factor


def _raise_loss(steps: pd.DataFrame, start: int, stop: int, sigmas: float) -> None:
    # A rise of `sigmas` times the loss's own per-step noise (1% log-normal), below the detector's 7.
    rows = (steps["step"] >= start) & (steps["step"] < stop)
    steps.loc[rows, "loss"] *= np.exp(0.01 * sigmas)


def test_a_falling_loss_back_under_its_level_before_the_jump_has_recovered():
    steps = healthy_steps()
    _raise_loss(steps, J + 1, len(steps), 5.0)  # the falling trend soon takes it below the pre-jump level
    [inc] = lr_jump_incidents(steps, [{"step": J, "direction": "up"}], [], DetectorConfig(), AnalysisConfig())
    assert inc.recovered and J < inc.recovery_step < len(steps)


def test_a_moderate_loss_rise_after_an_upward_lr_jump_is_an_lr_schedule_incident(tmp_path):
    steps = healthy_steps()
    _jump_lr(steps)
    _raise_loss(steps, J + 1, J + 25, 4.0)
    assert not [i for i in find_incidents(steps[["step", "loss"]]) if i.onset_step >= J - 5]  # below the scan
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    [inc] = diagnosis.incidents
    assert (inc.kind, inc.onset_step, inc.cause, inc.recovered) == ("loss_spike", J, "lr_schedule", True)
    assert inc.series["loss"]["level_sigma"] >= AnalysisConfig().lr_response_sigma
    assert any("found by the LR-jump test" in note for note in diagnosis.context[0]["notes"])


def test_the_same_loss_rise_without_an_lr_jump_is_no_incident(tmp_path):
    steps = healthy_steps()
    _raise_loss(steps, J + 1, J + 25, 4.0)
    assert analyze(write_run(tmp_path / "run", steps)).incidents == []


def test_an_upward_lr_jump_the_loss_does_not_answer_is_a_finding_not_an_incident(tmp_path):
    steps = healthy_steps()
    _jump_lr(steps, 3.0)
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    assert diagnosis.incidents == []
    assert [f.id for f in diagnosis.findings if f.id == "lr_discontinuity"] == ["lr_discontinuity"]


def test_a_downward_lr_jump_is_not_tested():
    steps = healthy_steps()
    _raise_loss(steps, J + 1, J + 25, 6.0)
    jump = {"step": J, "direction": "down"}
    assert lr_jump_incidents(steps, [jump], [], DetectorConfig(), AnalysisConfig()) == []


def test_a_jump_the_detector_already_explains_is_not_reported_twice():
    steps = healthy_steps()
    steps.loc[steps["step"] == J + 3, "loss"] *= 1.5
    found = find_incidents(steps[["step", "loss", "grad_norm"]])
    assert [i.onset_step for i in found] == [J + 3]
    jump = {"step": J, "direction": "up"}
    assert lr_jump_incidents(steps, [jump], found, DetectorConfig(), AnalysisConfig()) == []


def test_a_jump_with_too_little_history_is_not_tested():
    steps = healthy_steps()
    early = 40  # fewer than min_history warm windows end before it
    steps.loc[steps["step"] >= early, "loss"] *= np.exp(0.08)
    jump = {"step": early, "direction": "up"}
    assert lr_jump_incidents(steps, [jump], [], DetectorConfig(), AnalysisConfig()) == []


def test_a_rise_that_lasts_to_the_end_of_the_run_is_a_divergence():
    steps = healthy_steps(loss0=2.0, floor=2.0)  # flat: nothing but the rise moves the loss
    _raise_loss(steps, J + 1, len(steps), 5.0)
    [inc] = lr_jump_incidents(steps, [{"step": J, "direction": "up"}], [], DetectorConfig(), AnalysisConfig())
    assert (inc.kind, inc.recovered, inc.series["loss"]["persistent"]) == ("divergence", False, True)


def test_level_sigma_matches_a_brute_force_window_mean_against_earlier_windows():
    steps = healthy_steps()
    span, det = 20, DetectorConfig()
    level = window_level(steps["step"].to_numpy(), steps["loss"].to_numpy(), span, det, log_scale=False)
    z = level["z"].to_numpy()
    at = 300
    brute_level = [np.nanmean(z[i:i + span]) for i in range(len(z))]
    history = np.array([brute_level[i] for i in range(at - span + 1) if level["warm"].iloc[i]])
    center = np.median(history)
    sigma = 1.4826 * np.median(np.abs(history - center))
    assert np.isclose(level_sigma(level, at, span, det.min_history)[0], (brute_level[at] - center) / sigma, rtol=1e-4)


# ------------------------------------------------------------------------------ warmup


def _grad_rise(steps: pd.DataFrame, start: int, stop: int, factor: float) -> None:
    rows = (steps["step"] >= start) & (steps["step"] < stop)
    steps.loc[rows, "grad_norm"] *= factor


def test_a_grad_norm_rise_inside_the_lr_warmup_is_a_warning_not_an_incident(tmp_path):
    steps = healthy_steps(warmup=50)
    _grad_rise(steps, 5, 40, 2.5)
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    assert diagnosis.incidents == []
    assert any("during the LR warmup" in w for w in diagnosis.warnings)


def test_the_same_grad_norm_rise_after_the_warmup_is_an_incident(tmp_path):
    steps = healthy_steps(warmup=50)
    _grad_rise(steps, 305, 340, 2.5)
    incidents = analyze(write_run(tmp_path / "run", steps)).incidents
    assert [(i.kind, i.onset_step) for i in incidents] == [("grad_spike", 305)]


def test_a_loss_spike_inside_the_warmup_is_still_an_incident(tmp_path):
    steps = healthy_steps(warmup=50)
    steps.loc[steps["step"] == 30, "loss"] *= 2.0
    incidents = analyze(write_run(tmp_path / "run", steps)).incidents
    assert [(i.kind, i.onset_step) for i in incidents] == [("loss_spike", 30)]
