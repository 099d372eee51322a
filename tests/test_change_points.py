"""Incidents at known change points (spikedoc/analysis/change_points.py), on real tiny runs the rule
was not set on: a size (d_model 24) and seeds (300+) outside the exam's design."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spikedoc
from bench._exam_train import Fault, Setup, train
from spikedoc.analysis.change_points import (
    anomalous_batches,
    change_point_incidents,
    trajectory_departures,
    trajectory_response,
    weight_returns,
)
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.detect import DetectorConfig, find_incidents
from spikedoc.analysis.recovery import RecoveryConfig, fit_trajectory
from spikedoc.report.terminal import action_text

_ROOT = Path(tempfile.mkdtemp(prefix="spikedoc-change-points-"))


@functools.cache
def _run(name: str, setup: Setup, fault: Fault | None) -> Path:
    train(setup, fault, _ROOT / name / "run", _ROOT / name / "ckpt")
    return _ROOT / name / "run"


def _reinit(optimizer: str = "adamw") -> Path:
    setup = Setup(seed=301, d_model=24, n_layer=2, optimizer=optimizer, warmup=12)
    return _run(f"reinit-{optimizer}", setup, Fault(family="state_reset", kind="reinit", step=70))


def test_a_reinit_of_the_weights_late_in_a_short_run_is_found_as_state_reset():
    incidents = spikedoc.analyze(_reinit()).incidents
    at = [i for i in incidents if abs(i.onset_step - 70) <= 2]
    assert at and at[0].cause == "state_reset"


def _load_state(run: Path, step: int) -> dict:
    inc = next(i for i in spikedoc.analyze(run).incidents if abs(i.onset_step - step) <= 2 and i.cause == "state_reset")
    return next(a for a in inc.recommendation["actions"] if a["action"] == "load_state")


def test_a_reinit_where_no_resume_happened_is_not_blamed_on_a_checkpoint_load():
    action = _load_state(_reinit("sgd"), 70)
    assert action["at_resume"] is None
    assert action_text(action).startswith(f"find what set the weights back at step {action['step']}")


def test_a_resume_that_never_loaded_the_weights_is_told_to_load_them():
    setup = Setup(seed=303, d_model=24, n_layer=1, optimizer="adam", warmup=6)
    action = _load_state(_run("resume-fresh", setup, Fault(family="state_reset", kind="resume_fresh", step=55)), 55)
    assert action["at_resume"] == 1
    assert action_text(action).startswith("resume with the model and optimizer state loaded from the checkpoint")


def test_a_reinit_is_found_under_sgd_too():
    incidents = spikedoc.analyze(_reinit("sgd")).incidents
    assert any(abs(i.onset_step - 70) <= 2 and i.cause == "state_reset" for i in incidents)


def test_a_resume_that_never_loaded_the_weights_is_found_at_the_resume():
    setup = Setup(seed=303, d_model=24, n_layer=1, optimizer="adam", warmup=6)
    run = _run("resume-fresh", setup, Fault(family="state_reset", kind="resume_fresh", step=55))
    assert any(abs(i.onset_step - 55) <= 2 and i.cause == "state_reset" for i in spikedoc.analyze(run).incidents)


def test_an_lr_surge_with_too_little_history_for_the_detector_is_found_as_lr_schedule():
    setup = Setup(seed=305, d_model=24, n_layer=2, optimizer="adamw", warmup=12)
    run = _run("surge", setup, Fault(family="lr_surge", kind="surge", step=60, length=6, factor=15.0))
    incidents = spikedoc.analyze(run).incidents
    assert any(60 - 2 <= i.onset_step <= 65 + 2 and i.cause == "lr_schedule" for i in incidents)


def test_a_clean_run_has_no_weight_return():
    run = _run("clean", Setup(seed=301, d_model=24, n_layer=2, optimizer="adamw", warmup=12), None)
    assert weight_returns(spikedoc.load(run).steps, AnalysisConfig()) == []


def test_the_weight_return_of_a_reinit_is_at_its_step_and_most_of_the_way_back():
    [r] = weight_returns(spikedoc.load(_reinit()).steps, AnalysisConfig())
    assert r["step"] == 70 and 0.5 <= r["share"] <= 1.5


def test_a_norm_that_never_left_its_start_has_no_weight_return():
    frame = pd.DataFrame({"step": range(6), "param_norm": [10.0, 10.01, 10.02, 10.0, 10.03, 10.0]})
    assert weight_returns(frame, AnalysisConfig()) == []


def test_trajectory_response_is_the_mean_excess_over_the_trajectory_fitted_before():
    rng = np.random.default_rng(0)
    steps = np.arange(80)
    loss = 4.0 - 0.3 * np.log(steps + 1.0) + 0.02 * rng.standard_normal(80)
    loss[50:] += 0.4
    cfg = RecoveryConfig()
    test = trajectory_response(steps, loss, 50, span=20, recovery=cfg)
    t = fit_trajectory(steps[:50], loss[:50], cfg)
    brute = np.mean(np.clip(loss[50:70] - np.array([t.at(s) for s in steps[50:70]]), -5 * t.sigma, 5 * t.sigma))
    assert math.isclose(test["mean"], brute, rel_tol=1e-12) and test["z"] > 10


def test_trajectory_response_needs_history_before_the_change():
    steps = np.arange(30)
    assert trajectory_response(steps, np.ones(30), 5, span=20, recovery=RecoveryConfig()) is None


# ------------------------------------------------------------------------------------ causes of the exam's families, held out


def test_a_nan_loss_the_optimizer_stepped_past_is_numerics_not_the_batch():
    # Lion steps on the sign of its momentum: one NaN loss leaves the run finite again at the next step.
    setup = Setup(seed=307, d_model=24, n_layer=2, optimizer="lion", warmup=12)
    run = _run("lion-nan", setup, Fault(family="nonfinite", kind="loss_nan", step=80))
    inc = next(i for i in spikedoc.analyze(run).incidents if abs(i.onset_step - 80) <= 2)
    actions = {a["action"] for a in inc.recommendation["actions"]}
    assert inc.cause == "numerics_rank", inc.evidence
    assert not {"lower_lr", "tighten_clip"} & actions


def test_an_instability_in_the_first_steps_without_warmup_is_lr_too_high():
    setup = Setup(seed=309, d_model=24, n_layer=2, optimizer="adamw", warmup=12)
    run = _run("no-warmup", setup, Fault(family="instability", kind="no_warmup", step=0, factor=40.0))
    first = spikedoc.analyze(run).incidents[0]
    assert first.onset_step < 10 and first.cause == "lr_too_high", first.evidence


def test_a_single_overlong_batch_early_in_a_short_run_is_found_as_bad_batch():
    setup = Setup(seed=311, d_model=24, n_layer=2, optimizer="adam", warmup=12)
    run = _run("long-batch", setup, Fault(family="bad_batch", kind="long", step=75))
    inc = next(i for i in spikedoc.analyze(run).incidents if abs(i.onset_step - 75) <= 2)
    assert inc.cause == "bad_batch" and 75 in inc.recommendation["skip_steps"], inc.evidence


def test_a_clean_run_has_no_anomalous_batch():
    from spikedoc.analysis.batches import batch_profile

    steps = spikedoc.load(_run("clean", Setup(seed=301, d_model=24, n_layer=2, optimizer="adamw", warmup=12), None)).steps
    assert anomalous_batches(steps, batch_profile(steps), AnalysisConfig()) == []


@pytest.mark.parametrize(("seed", "kind", "optimizer"), [(313, "long", "adamw"), (315, "random", "adam")])
def test_a_batch_whose_input_is_anomalous_is_bad_batch_whatever_the_optimizer_state_did(seed, kind, optimizer):
    setup = Setup(seed=seed, d_model=24, n_layer=3, optimizer=optimizer, warmup=6)
    run = _run(f"input-{kind}", setup, Fault(family="bad_batch", kind=kind, step=45, length=3))
    inc = next(i for i in spikedoc.analyze(run).incidents if 43 <= i.onset_step <= 49)
    assert inc.cause == "bad_batch", inc.evidence


def _falling(n: int = 150, seed: int = 0) -> pd.DataFrame:
    """A loss still falling fast over the detector's whole window, with 1% noise."""
    rng = np.random.default_rng(seed)
    step = np.arange(n)
    return pd.DataFrame({"step": step, "loss": (3.0 + 2.5 * np.exp(-step / 40)) * np.exp(rng.normal(0, 0.01, n))})


def test_a_one_step_excess_inside_a_band_that_holds_the_fall_is_a_candidate_step():
    frame = _falling()
    frame.loc[frame["step"] == 90, "loss"] *= 1.25  # about 25 sigmas of the noise, inside the band of the fall
    assert find_incidents(frame) == []  # the case this test is about
    assert 90 in trajectory_departures(frame, AnalysisConfig(), DetectorConfig())


def test_a_flat_loss_is_left_to_the_detector_however_high_its_spike():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"step": np.arange(300), "loss": 3.0 * np.exp(rng.normal(0, 0.01, 300))})
    frame.loc[frame["step"] == 200, "loss"] *= 1.5
    assert trajectory_departures(frame, AnalysisConfig(), DetectorConfig()) == []
    assert [i.onset_step for i in find_incidents(frame)] == [200]


def test_a_one_step_change_back_under_its_bar_at_the_next_step_is_a_one_step_incident():
    frame = _falling()
    frame.loc[frame["step"] == 90, "loss"] *= 1.25
    [incident] = change_point_incidents(frame, [{"step": 90, "why": "loss", "one_step": True}], [], AnalysisConfig())
    assert (incident.onset_step, incident.end_step, incident.recovery_step) == (90, 90, 91)
