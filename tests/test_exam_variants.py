"""The exam's faults on real tiny runs the exam does not hold (other seeds, steps and setups): the
cause rules behave on variants they were not fitted to."""

from __future__ import annotations

import pytest

import spikedoc
from bench._exam_train import Fault, Setup, train
from spikedoc.analysis.detect import find_incidents
from spikedoc.store.reader import load


def _trained(tmp_path, setup: Setup, fault: Fault):
    train(setup, fault, tmp_path / "run", tmp_path / "ckpt")
    return tmp_path / "run"


def _actions(incident) -> list[str]:
    return [a["action"] for a in incident.recommendation["actions"]]


@pytest.mark.parametrize("kind, step", [("loss_inf", 80), ("loss_nan", 95), ("weight_inf", 64)])
def test_a_nan_long_after_an_early_gradient_spike_that_came_back_is_numerics(tmp_path, kind, step):
    # No warmup to speak of: the gradient norm spikes in the first steps and is back in its band
    # within a few; the non-finite value comes tens of steps later, with nothing building up to it.
    run = _trained(tmp_path, Setup(seed=4005, optimizer="adam", warmup=6), Fault(family="nonfinite", kind=kind, step=step))
    early = [i for i in find_incidents(load(run).steps) if i.kind == "grad_spike" and i.onset_step < step - 20]
    assert early and all(i.series["grad_norm"]["recovered"] for i in early)  # the case this test is about
    incident = next(i for i in spikedoc.analyze(run).incidents if i.kind == "nonfinite")
    assert (incident.onset_step, incident.cause) == (step, "numerics_rank")
    assert not {"lower_lr", "tighten_clip"} & set(_actions(incident))
