"""watch() on the tiny transformer: every recorded statistic against a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.common.brute import watched_run
from tests.common.models import make_model

STEPS = 4


def _layers_at(run, step: int) -> dict[str, dict]:
    frame = run.layers(first_step=step, last_step=step)
    return {row["name"]: row for row in frame.to_dict("records")}


def _adamw_groups(model: torch.nn.Module) -> list[dict]:
    # Three groups with their own lr, weight decay and betas: no decay on norms/biases, as usual.
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if p.dim() >= 2 and not n.startswith("head")], "lr": 3e-3, "weight_decay": 0.1},
        {"params": [p for n, p in named if p.dim() < 2], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        {"params": [p for n, p in named if n.startswith("head")], "lr": 5e-4, "weight_decay": 0.5, "eps": 1e-6},
    ]


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(_adamw_groups(m)),
    "adam_l2_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=2e-3, weight_decay=0.05, amsgrad=True),
    "adam_maximize": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, maximize=True, betas=(0.5, 0.9)),
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, dampening=0.1),
    "sgd_nesterov_wd": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01
    ),
    "sgd_plain_wd_maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=0.1, maximize=True),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.05),
    "rmsprop_centered": lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3, momentum=0.5, centered=True),
}


ADAM = ["adamw", "adam_l2_amsgrad", "adam_maximize"]
SGD_MOMENTUM = ["sgd_momentum", "sgd_nesterov_wd"]
OTHER = ["adagrad", "rmsprop_centered"]
_RUNS: dict = {}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    """`record(kind)`: the run and brute-force copies of STEPS steps with that optimizer (cached)."""

    def get(kind: str):
        if kind not in _RUNS:
            model = make_model(seed=1)
            run, copies = watched_run(model, OPTIMIZERS[kind](model), tmp_path_factory.mktemp(kind), STEPS)
            _RUNS[kind] = (kind, run, copies)
        return _RUNS[kind]

    yield get
    _RUNS.clear()


@pytest.fixture(params=sorted(OPTIMIZERS))
def recorded(request, record):
    return record(request.param)


def test_one_step_row_per_optimizer_step(recorded):
    _, run, _ = recorded
    assert run.steps["step"].tolist() == list(range(STEPS))
    assert (run.steps["micro_batches"] == 1).all()


def test_total_grad_norm_matches_clip_grad_norm(recorded):
    _, run, copies = recorded
    expected = [c.total_grad_norm for c in copies]
    np.testing.assert_allclose(run.steps["grad_norm"], expected, rtol=1e-5)


def test_layer_grad_norms_and_max_match_direct_computation(recorded):
    _, run, copies = recorded
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        assert set(layers) == set(c.before)
        for name, g in c.grads.items():
            assert layers[name]["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-5, abs=1e-12)
            assert layers[name]["grad_max"] == pytest.approx(g.abs().max().item(), rel=1e-6, abs=1e-12)
            assert layers[name]["nonfinite"] == 0


def test_param_norms_match_direct_computation(recorded):
    _, run, copies = recorded
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, p in c.after.items():
            assert layers[name]["param_norm"] == pytest.approx(p.norm().item(), rel=1e-5)
        total = math.sqrt(sum(p.norm().item() ** 2 for p in c.after.values()))
        assert run.steps["param_norm"][step] == pytest.approx(total, rel=1e-5)


def _assert_update_norm(layers: dict, c, step: int, name: str) -> tuple[float, float]:
    """The recorded update norm of `name` against the parameter difference; returns (diff, tol)."""
    diff = (c.after[name].double() - c.before[name].double()).norm().item()
    # The reference itself is a difference of fp32 values: exact to ~1e-7 of |p| per element.
    tol = 2e-7 * c.before[name].norm().item() + 1e-3 * diff
    assert abs(layers[name]["update_norm"] - diff) <= tol, (step, name)
    return diff, tol


def test_update_norm_matches_parameter_difference(recorded):
    _, run, copies = recorded
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name in c.before:
            diff, tol = _assert_update_norm(layers, c, step, name)
            before = c.before[name].norm().item()
            ratio = diff / before if before > 0 else math.inf
            assert layers[name]["update_ratio"] == pytest.approx(ratio, rel=1e-3, abs=tol / max(before, 1e-30))
        total = math.sqrt(sum((c.after[n].double() - c.before[n].double()).norm().item() ** 2 for n in c.before))
        assert run.steps["update_norm"][step] == pytest.approx(total, rel=1e-3)


def _group_of(run, name: str) -> dict:
    return next(g for g in run.meta["optimizer"]["groups"] if name in g["params"])


@pytest.mark.parametrize("kind", ADAM)
def test_adam_state_statistics_match_state_tensors(record, kind):
    _, run, copies = record(kind)
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, state in c.state.items():
            hp = _group_of(run, name)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            row = layers[name]
            assert row["exp_avg_norm"] == pytest.approx(m.norm().item(), rel=1e-5, abs=1e-20)
            assert row["exp_avg_sq_mean"] == pytest.approx(v.double().mean().item(), rel=1e-5, abs=1e-30)
            assert row["exp_avg_sq_max"] == pytest.approx(v.max().item(), rel=1e-6, abs=1e-30)
            v_denom = state["max_exp_avg_sq"] if hp["amsgrad"] else v
            t = state["step"].item()
            v_hat_sqrt = v_denom.sqrt() / math.sqrt(1 - hp["betas"][1] ** t)
            expected = (v_hat_sqrt <= hp["eps"]).double().mean().item()
            assert row["eps_frac"] == pytest.approx(expected, abs=1e-7), (step, name)


@pytest.mark.parametrize("kind", ["adamw", "adam_maximize"])
def test_eps_frac_sees_parameters_whose_gradient_is_exactly_zero(record, kind):
    _, run, _ = record(kind)
    # The attention key bias cannot change the softmax: its gradient is exactly zero, so v stays 0
    # and a third of qkv.bias (the k part) is at or below eps. (Not with Adam's L2 decay, which
    # adds wd * p to that zero gradient.)
    row = _layers_at(run, STEPS - 1)["blocks.0.qkv.bias"]
    assert row["eps_frac"] == pytest.approx(1 / 3, abs=0.02)


@pytest.mark.parametrize("kind", SGD_MOMENTUM)
def test_sgd_momentum_norm_matches_buffer(record, kind):
    _, run, copies = record(kind)
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, state in c.state.items():
            assert layers[name]["momentum_norm"] == pytest.approx(state["momentum_buffer"].norm().item(), rel=1e-5)


@pytest.mark.parametrize("kind", OTHER)
def test_other_optimizers_record_every_state_tensor_norm(record, kind):
    _, run, copies = record(kind)
    layers = _layers_at(run, STEPS - 1)
    c = copies[-1]
    for name, state in c.state.items():
        for key, value in state.items():
            if value.dim() > 0:
                assert layers[name][f"state_norm_{key}"] == pytest.approx(value.norm().item(), rel=1e-5)
    # The tiny model fits the snapshot whole: every update norm is the exact parameter difference, and says so.
    assert run.meta["watch"]["update_norm"] == "exact"
    assert {p["update_norm"] for p in run.meta["parameters"]} == {"exact"}


def test_learning_rate_of_every_group_is_recorded(recorded):
    kind, run, _ = recorded
    groups = run.meta["optimizer"]["groups"]
    for g, group in enumerate(groups):
        column = "lr" if g == 0 else f"lr_{g}"
        assert run.steps[column].tolist() == pytest.approx([group["lr"]] * STEPS)


def test_meta_describes_parameters_and_decay(recorded):
    kind, run, copies = recorded
    meta = run.meta
    names = [p["name"] for p in meta["parameters"]]
    assert sorted(names) == sorted(copies[0].before)
    by_name = {p["name"]: p for p in meta["parameters"]}
    assert by_name["blocks.0.qkv.weight"]["module"] == "Linear"
    assert by_name["blocks.0.qkv.weight"]["shape"] == [96, 32]
    assert meta["torch_version"] == torch.__version__
    if kind == "adamw":
        decayed = set(meta["optimizer"]["weight_decay_params"])
        assert "blocks.0.qkv.weight" in decayed and "blocks.0.qkv.bias" not in decayed
        assert meta["optimizer"]["groups"][1]["betas"] == [0.8, 0.95]


def test_update_norm_is_labelled_exact_when_every_tensor_is_measured_exactly(recorded):
    # Adam and SGD by their closed forms; the others because the tiny model fits the snapshot whole.
    kind, run, _ = recorded
    assert run.meta["watch"]["update_norm"] == "exact"
    assert all(p["update_norm"] == "exact" for p in run.meta["parameters"])


def test_loss_is_captured_from_the_model_output(recorded):
    _, run, copies = recorded
    np.testing.assert_allclose(run.steps["loss"], [c.loss for c in copies], rtol=1e-6)


@pytest.mark.parametrize("kind", ADAM)
def test_adam_statistics_without_a_parameter_copy_match_direct_computation(kind, tmp_path, monkeypatch):
    # A temporary budget below the model's size: no snapshot of the parameters (the closed form
    # from the optimizer state instead), and tensors cut into pieces that are folded back.
    monkeypatch.setattr("spikedoc.monitor._plan._TEMP_MIN", 1500)
    monkeypatch.setattr("spikedoc.monitor._plan._SNAPSHOT_MAX", 1500)
    model = make_model(seed=1)
    run, copies = watched_run(model, OPTIMIZERS[kind](model), tmp_path, STEPS)
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name in c.before:
            _assert_update_norm(layers, c, step, name)
        for name, state in c.state.items():
            hp = _group_of(run, name)
            v = state["exp_avg_sq"]
            v_denom = state["max_exp_avg_sq"] if hp["amsgrad"] else v
            v_hat_sqrt = v_denom.sqrt() / math.sqrt(1 - hp["betas"][1] ** state["step"].item())
            assert layers[name]["eps_frac"] == pytest.approx((v_hat_sqrt <= hp["eps"]).double().mean().item(), abs=1e-7)
            assert layers[name]["exp_avg_sq_mean"] == pytest.approx(v.double().mean().item(), rel=1e-5, abs=1e-30)
            assert layers[name]["exp_avg_sq_max"] == pytest.approx(v.max().item(), rel=1e-6, abs=1e-30)


def test_record_on_a_closed_monitor_warns_once_and_drops_the_values(tmp_path):
    # A loop holding a monitor a spikedoc.Guard has replaced at its rollback records into nothing:
    # said once, with what to do, never an exception.
    import warnings

    import spikedoc

    model = make_model(0)
    monitor = spikedoc.watch(model, torch.optim.AdamW(model.parameters()), run_dir=tmp_path / "run")
    monitor.close()
    with pytest.warns(UserWarning, match=r"closed monitor.*guard\.record") as caught:
        monitor.record(loss=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.record(loss=2.0)  # once only
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's line
