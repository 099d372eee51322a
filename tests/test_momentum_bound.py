"""A first moment grows by at most the gradient its update adds (`momentum_beyond`): exact on real
training loops of every optimizer it holds (coupled and decoupled weight decay, momentum, dampening,
Nesterov, clipping, accumulation), and a moment written from outside is beyond it at that step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lion_pytorch import Lion

import spikedoc
from spikedoc.analysis._meta import gradient_weight_decay
from spikedoc.analysis.state_precursors import momentum_beyond, wide_table
from spikedoc.store import load
from tests.common.models import make_model, train

STEPS = 30


def _ratios(run_dir, column):
    run = load(run_dir)
    layers = run.layers()
    wide = wide_table(layers, column)
    ratio, _ = momentum_beyond(layers, wide, gradient_weight_decay(run.meta))
    return ratio


def _recorded(tmp_path, make_optimizer, *, clip=None, accumulate=1, write_at=None):
    model = make_model(3)
    opt = make_optimizer(model.parameters())
    monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", budget=None)

    def before_step(i):
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if i == write_at:  # a writer from outside: every first moment x100 before this step's update
            for state in opt.state.values():
                for key in ("exp_avg", "momentum_buffer"):
                    if key in state:
                        state[key].mul_(100.0)

    train(model, opt, STEPS, accumulate=accumulate, before_step=before_step)
    monitor.close()
    return tmp_path / "run"


OPTIMIZERS = {
    "adam_coupled_decay": (lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=0.1), "exp_avg_norm"),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1), "exp_avg_norm"),
    "sgd_nesterov_decay": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), "momentum_norm"),
    "sgd_dampening": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), "momentum_norm"),
    "lion": (lambda p: Lion(p, lr=3e-4, weight_decay=0.1), "momentum_norm"),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_healthy_first_moment_never_grows_beyond_what_its_gradients_add(tmp_path, name):
    make, column = OPTIMIZERS[name]
    ratio = _ratios(_recorded(tmp_path, make, clip=1.0, accumulate=2), column).to_numpy()
    assert np.isfinite(ratio).sum() >= (STEPS - 2) * ratio.shape[1] // 2  # judged on most steps and tensors
    assert np.nanmax(ratio) <= 1 + 1e-4


@pytest.mark.parametrize("name", ["adam_coupled_decay", "sgd_nesterov_decay", "lion"])
def test_a_first_moment_written_from_outside_is_beyond_its_bound_at_that_step_only(tmp_path, name):
    make, column = OPTIMIZERS[name]
    ratio = _ratios(_recorded(tmp_path, make, write_at=17), column)
    beyond = ratio.index[(ratio > 1 + 1e-4).any(axis=1)].tolist()
    assert beyond == [17]


def test_an_optimizer_whose_moment_follows_another_rule_is_not_held_to_it():
    meta = {"optimizer": {"class": "bitsandbytes.optim.adam.Adam8bit", "groups": [{"weight_decay": 0.0, "params": ["w"]}]}}
    assert gradient_weight_decay(meta) == {}
