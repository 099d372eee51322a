"""Recovery and lasting damage against the pre-incident trajectory, offline and online, on real runs."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest

import spikedoc
from spikedoc.analysis.recovery import RecoveryConfig, RecoveryTracker, fit_trajectory, judge_recovery, lasting_excess

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


# ------------------------------------------------------------------------- lasting shift, by statistics


def _newey_west_brute(r: np.ndarray, lags: int) -> float:
    """The Newey-West standard error of the mean written out term by term."""
    n, m = len(r), float(np.mean(r))
    total = 0.0
    for i in range(n):
        for j in range(n):
            k = abs(i - j)
            if k <= lags:
                total += (1 - k / (lags + 1)) * (r[i] - m) * (r[j] - m)
    return math.sqrt(total / n / n)


@pytest.mark.parametrize("n", [25, 60, 100])
def test_the_standard_error_of_the_lasting_shift_is_newey_west(n):
    rng = np.random.default_rng(n + 1)
    r = np.zeros(n)
    for t in range(1, n):  # AR(1): neighbouring losses are correlated
        r[t] = 0.7 * r[t - 1] + rng.normal(0, 0.01)
    mean, se = lasting_excess(r, sigma=1.0)
    assert mean == pytest.approx(r.mean())
    assert se == pytest.approx(_newey_west_brute(r, int(4 * (n / 100) ** (2 / 9))), rel=1e-9)


def test_positively_correlated_residuals_get_a_wider_standard_error_than_independent_ones():
    rng = np.random.default_rng(7)
    e = rng.normal(0, 0.01, 100)
    ar = np.zeros(100)
    for t in range(1, 100):
        ar[t] = 0.8 * ar[t - 1] + e[t]
    _, se = lasting_excess(ar, sigma=1.0)
    assert se > 1.5 * ar.std() / math.sqrt(100)


def _shifted(shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A long curve with a minibatch's 5% noise per step, a 2.5x spike at step 701, then the loss
    `shift` (a share) above where it was heading."""
    rng = np.random.default_rng(seed)
    steps = np.arange(900)
    loss = (2.0 + 3.0 * (steps + 10.0) ** -0.3) * np.exp(rng.normal(0, 0.05, steps.size))
    loss[701] *= 2.5
    loss[702:] *= 1.0 + shift
    return steps, loss


@pytest.mark.parametrize("seed", [3, 5])
def test_a_lasting_shift_inside_the_noise_of_one_step_is_damage_when_it_is_many_standard_errors(seed):
    steps, loss = _shifted(0.08, seed)  # 1.6 of one step's noise: the 20-step median is within its tolerance
    rec = judge_recovery(steps, loss, onset_step=701, end_step=701)
    assert rec.verdict == "recovered_with_damage"
    assert rec.excess_sigma <= RecoveryConfig().tolerance_sigma  # the median test alone would call it recovered
    assert rec.shift_ratio >= RecoveryConfig().damage_floor and rec.shift_z >= RecoveryConfig().damage_z


@pytest.mark.parametrize("seed", [3, 5])
def test_a_shift_of_one_steps_noise_is_not_told_from_a_healthy_runs_wander(seed):
    steps, loss = _shifted(0.04, seed)
    assert judge_recovery(steps, loss, onset_step=701, end_step=701).verdict == "recovered"


@pytest.mark.parametrize("seed", [3, 5])
def test_a_real_but_tiny_shift_is_below_the_practical_floor(seed):
    steps, loss = _shifted(0.005, seed)
    assert judge_recovery(steps, loss, onset_step=701, end_step=701).verdict == "recovered"


def test_without_a_fitted_trajectory_no_shift_can_be_measured():
    tracker = RecoveryTracker(5, range(5), [3.0, 2.9, 2.8, 2.8, 2.7])  # fewer than min_fit_steps healthy steps
    assert tracker.trajectory.fit_steps == 0
    assert tracker.extrapolation_se(2.7) == math.inf


def test_the_trajectory_is_less_certain_the_more_progress_it_expects():
    steps = np.arange(200)
    loss = 2.0 + 3.0 * (steps + 10.0) ** -0.3 + np.random.default_rng(11).normal(0, 0.02, 200)
    tracker = RecoveryTracker(200, steps, loss)
    t = tracker.trajectory
    assert tracker.extrapolation_se(t.at(400)) > tracker.extrapolation_se(t.at(220)) > 0
    assert tracker.tolerance(400) >= tracker.tolerance(220)


def test_a_line_that_misses_its_own_last_steps_is_that_uncertain_at_its_anchor():
    steps = np.arange(80)
    loss = np.where(steps < 40, 5.0 - 0.05 * steps, 3.0)  # a fast fall, then flat: no straight line in log-step follows both
    t = fit_trajectory(steps, loss)
    residuals = loss - (t.intercept + t.slope * np.log(steps + 1.0))
    miss = abs(float(np.median(residuals[-RecoveryConfig().hold_steps // 2 :])))
    assert miss > 0.05
    assert t.level_se >= miss
