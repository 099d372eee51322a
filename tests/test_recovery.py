"""Recovery and lasting damage against the pre-incident trajectory, offline and online, on real runs."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest

import spikedoc
from spikedoc.analysis.recovery import RecoveryConfig, RecoveryTracker, fit_trajectory, judge_recovery

RUNS = Path(__file__).resolve().parent.parent / "sample_runs"


@functools.cache
def _loss(name: str) -> tuple[np.ndarray, np.ndarray]:
    steps = spikedoc.load(RUNS / name).steps.sort_values("step")
    return steps["step"].to_numpy(), steps["loss"].to_numpy(dtype=float)


def _power_law(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return steps, 2.0 + 3.0 * (steps + 10.0) ** -0.3 * np.exp(rng.normal(0, 0.01, n))


def test_trajectory_slope_is_never_positive():
    steps = np.arange(100, 200)
    assert fit_trajectory(steps, 2.0 + 0.001 * steps).slope == 0.0


def test_a_spike_that_returns_to_the_trajectory_is_recovered_after_a_stretch_not_one_point():
    steps, loss = _power_law()
    loss[250] *= 3.0
    rec = judge_recovery(steps, loss, onset_step=250, end_step=250)
    assert (rec.verdict, rec.back_step) == ("recovered", 251)
    assert rec.excess_sigma < RecoveryConfig().tolerance_sigma


def test_a_lasting_offset_inside_the_detector_band_is_damage():
    steps, loss = _power_law()
    loss[250:] *= 1.08  # about 8 sigma of this noise: back "in band" for a 7-sigma band, not on track
    loss[250:255] *= 2.0
    rec = judge_recovery(steps, loss, onset_step=250, end_step=254)
    assert rec.verdict in ("recovered_with_damage", "persistent") and rec.excess_ratio == pytest.approx(0.08, abs=0.03)


def test_non_finite_losses_in_a_row_are_a_divergence():
    steps, loss = _power_law()
    loss[300:] = np.nan
    assert judge_recovery(steps, loss, onset_step=300, end_step=399).verdict == "divergence"


def test_online_tracker_decides_within_patience_and_agrees_with_the_offline_judgement():
    steps, loss = _power_law()
    loss[200:] *= 1.3
    cfg = RecoveryConfig()
    tracker = RecoveryTracker(200, steps[:200], loss[:200], config=cfg)
    states = [tracker.update(int(s), float(v)) for s, v in zip(steps[200:], loss[200:])]
    first = next(i for i, st in enumerate(states) if st.decided)
    assert first <= cfg.patience_steps and states[first].verdict == "persistent"
    offline = judge_recovery(steps, loss, onset_step=200, end_step=200, config=cfg)
    assert offline.verdict == "persistent"


def test_tracker_state_round_trips_and_continues_identically():
    steps, loss = _power_law()
    loss[200:210] *= 2.0
    a = RecoveryTracker(200, steps[:200], loss[:200])
    for s in range(200, 215):
        a.update(s, loss[s])
    b = RecoveryTracker(0, [], [])
    b.load_state_dict(a.state_dict())
    assert [a.update(s, loss[s]) for s in range(215, 260)] == [b.update(s, loss[s]) for s in range(215, 260)]


def test_tracker_refuses_a_state_from_other_settings():
    a = RecoveryTracker(10, range(10), [1.0] * 10, config=RecoveryConfig(hold_steps=10))
    with pytest.raises(ValueError, match="other RecoveryConfig"):
        RecoveryTracker(10, range(10), [1.0] * 10).load_state_dict(a.state_dict())


@pytest.mark.parametrize("name", ["clean", "clean_seed1", "clean_seed2", "clean_seed3", "clean_bias"])
def test_no_false_damage_at_any_step_of_a_healthy_real_run(name):
    # Every step after warmup, taken as if an incident had happened there, must judge as recovered.
    steps, loss = _loss(name)
    verdicts = {judge_recovery(steps, loss, onset_step=s, end_step=s).verdict for s in range(60, 295, 3)}
    assert verdicts == {"recovered"}


def test_the_lr_surge_leaves_damage_that_the_twin_confirms():
    steps, loss = _loss("lr_surge")
    _, clean = _loss("clean")
    rec = judge_recovery(steps, loss, onset_step=152, end_step=153)
    assert rec.verdict != "recovered"
    truth = np.median(loss[rec.damage_step - 19 : rec.damage_step + 1] / clean[rec.damage_step - 19 : rec.damage_step + 1]) - 1
    assert truth > 0.1 and rec.excess_ratio > 0.1  # both say lasting damage of more than 10%


def test_a_bad_batch_that_left_no_damage_recovers():
    steps, loss = _loss("bad_batch_constant")
    rec = judge_recovery(steps, loss, onset_step=140, end_step=140)
    assert rec.verdict == "recovered" and rec.back_step == 141
    assert math.isfinite(rec.excess_sigma) and rec.excess_sigma < RecoveryConfig().tolerance_sigma
