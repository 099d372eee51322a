"""The online stop judgement agrees with the offline one `analyze` uses, and its settings are checked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spikedoc.analysis.detect import flag_series
from spikedoc.analysis.recovery import RecoveryConfig, RecoveryTracker
from spikedoc.integrations import IncidentWatch, StopConfig


START = 1000  # late enough that the curve's fall within the detector's window is small next to a spike


def loss_curve(n: int, seed: int = 0) -> np.ndarray:
    """Loss of steps START.. START + n - 1: a power-law fall with 1% noise."""
    rng = np.random.default_rng(seed)
    return 4.0 - 0.3 * np.log(START + np.arange(n) + 1.0) + 0.01 * rng.standard_normal(n)


@pytest.mark.parametrize(("jump", "expected"), [(0.5, "persistent"), (math.nan, "divergence")])
def test_online_verdict_equals_the_offline_tracker_on_the_same_series(jump, expected):
    loss = loss_curve(300)
    loss[150:] += jump
    steps, onset = START + np.arange(300), START + 150
    watch = IncidentWatch()
    decision = next(d for s, v in zip(steps, loss) if (d := watch.update(s, v)) is not None)
    assert decision.onset_step == onset and decision.verdict == expected
    # Offline: the healthy steps the detector did not flag fit the trajectory, then the tracker runs from onset.
    flags = flag_series(steps, loss)
    healthy = (~flags["flagged"].to_numpy()) & (steps < onset)
    tracker = RecoveryTracker(onset, steps[healthy], loss[healthy], config=RecoveryConfig())
    offline = next(st for s, v in zip(steps[150:], loss[150:]) if (st := tracker.update(s, v)).decided)
    assert (offline.step, offline.verdict) == (decision.step, decision.verdict)


def test_a_spike_that_recovers_does_not_stop():
    loss = loss_curve(300)
    loss[150] += 2.0
    watch = IncidentWatch()
    assert all(watch.update(s, v) is None for s, v in zip(START + np.arange(300), loss))
    assert [(onset, state.verdict) for onset, state in watch.decided] == [(START + 150, "recovered")]


def test_stop_on_names_the_verdicts_it_accepts():
    with pytest.raises(ValueError, match="recovered"):
        StopConfig(stop_on=("recovered",))
    assert StopConfig(stop_on=["recovered_with_damage"]).stop_on == ("recovered_with_damage",)
