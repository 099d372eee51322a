"""Specification of the overview's downsampling: a min/max envelope never smooths a spike away."""

from __future__ import annotations

import numpy as np

from spikedoc.report.envelope import envelope


def test_a_one_step_spike_keeps_its_full_height_in_any_bucket():
    steps = np.arange(1_000_000)
    values = np.full(steps.size, 2.0)
    for where in (0, 333_333, 999_999):
        spiky = values.copy()
        spiky[where] = 50.0
        env = envelope(steps, spiky, buckets=1500)
        assert env.reduced and len(env.step) == 1500
        assert env.high.max() == 50.0 and env.low.min() == 2.0
        bucket = int(np.argmax(env.high))
        assert abs(env.step[bucket] - where) <= steps.size / 1500  # and it stays where it happened


def test_a_dip_is_kept_as_well_as_a_spike():
    values = np.full(10_000, 3.0)
    values[1234] = 0.5
    assert envelope(np.arange(10_000), values, buckets=100).low.min() == 0.5


def test_a_short_series_is_kept_point_for_point():
    values = np.linspace(3.0, 2.0, 2_000)
    env = envelope(np.arange(2_000), values, buckets=1_000)
    assert not env.reduced
    np.testing.assert_array_equal(env.high, values)
    np.testing.assert_array_equal(env.low, values)


def test_non_finite_values_stay_out_of_the_band_and_are_listed():
    values = np.full(100_000, 1.0)
    values[500:700] = np.nan  # a whole bucket of NaN
    values[50_000] = np.inf
    env = envelope(np.arange(100_000), values, buckets=1000)
    assert np.isfinite(env.high[~np.isnan(env.high)]).all() and np.isnan(env.high[5])
    assert env.nonfinite_steps.tolist() == [*range(500, 700), 50_000]
