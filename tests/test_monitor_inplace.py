"""Statistics stay true when the loop changes tensors in place between steps (restores, `.data` writes, zeroed gradients)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import spikedoc
from tests.common.models import make_model, train


def test_adam_update_norm_from_a_parameter_copy_matches_the_difference(tmp_path):
    # The copy path (models within the temporary budget) against brute force.
    from tests.common.brute import watched_run
    from tests.test_monitor import STEPS as N, _assert_update_norm, _layers_at

    model = make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    run, copies = watched_run(model, opt, tmp_path / "run", N, watch={"layer_every": 2})
    assert run.meta["watch"]["update_norm"] == "exact"
    for step, c in enumerate(copies):
        if step % 2 == 0:
            layers = _layers_at(run, step)
            for name in c.before:
                _assert_update_norm(layers, c, step, name)


@pytest.mark.filterwarnings("ignore:spikedoc. step_post failed:RuntimeWarning")
def test_statistics_stay_exact_when_parameters_are_restored_between_steps(tmp_path):
    # A rollback between steps (load_state_dict copies into the parameters in place) right after
    # a step: every step is recorded, and the steps after the restore measure against the restored
    # parameters.
    model = make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    saved = copy.deepcopy(model.state_dict())
    named = dict(model.named_parameters())
    before: list[dict[str, torch.Tensor]] = []
    after: list[dict[str, torch.Tensor]] = []

    def snap_before(i: int) -> None:
        before.append({n: p.detach().clone() for n, p in named.items()})

    def snap_after(i: int) -> None:
        after.append({n: p.detach().clone() for n, p in named.items()})
        if i % 3 == 0:
            model.load_state_dict(saved)

    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        train(model, opt, 10, before_step=snap_before, after_step=snap_after)
    run = spikedoc.load(tmp_path / "run")
    recorded = set(run.steps["step"])
    assert monitor.dropped_rows == 0 and recorded == set(range(10))
    layers = run.layers()
    for step in sorted(recorded):
        rows = layers[layers["step"] == step].set_index("name")
        for name in named:
            diff = (after[step][name].double() - before[step][name].double()).norm().item()
            tol = 2e-7 * before[step][name].norm().item() + 1e-3 * diff
            assert abs(rows.loc[name, "update_norm"] - diff) <= tol, (step, name)
            assert rows.loc[name, "param_norm"] == pytest.approx(after[step][name].norm().item(), rel=1e-5)
            norm_before = before[step][name].norm().item()
            if norm_before > 0:
                assert rows.loc[name, "update_ratio"] == pytest.approx(diff / norm_before, rel=1e-3, abs=1e-9)


def test_a_restore_between_steps_with_or_without_wait_keeps_every_step(tmp_path):
    model = make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    saved = copy.deepcopy(model.state_dict())
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:

        def restore(i: int) -> None:
            if i % 2:
                monitor.wait()
            model.load_state_dict(saved)

        train(model, opt, 6, after_step=restore)
    assert monitor.dropped_rows == 0
    assert spikedoc.load(tmp_path / "run").steps["step"].tolist() == list(range(6))


@pytest.mark.filterwarnings("ignore:spikedoc. step_post failed:RuntimeWarning")
def test_a_loop_zeroing_gradients_in_place_loses_at_most_one_step(tmp_path):
    # Gradient statistics are read after the step; zero_grad(set_to_none=False) right after it may
    # zero them first. That step is dropped (never recorded as zeros) and from then on the monitor
    # reads gradients before the step.
    model = make_model(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    norms = []
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        for input_ids, labels in _batches(8):
            model(input_ids, labels=labels).loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            opt.step()
            opt.zero_grad(set_to_none=False)
    run = spikedoc.load(tmp_path / "run")
    n_tensors = len(list(model.parameters()))
    assert monitor.dropped_rows in (0, 1 + n_tensors)
    assert len(run.steps) == 8 - monitor.dropped_rows // (1 + n_tensors)
    for step, grad_norm in zip(run.steps["step"], run.steps["grad_norm"]):
        assert grad_norm == pytest.approx(norms[step], rel=1e-5)


def _batches(n: int):
    from tests.common.models import char_text

    data = char_text().batches(8, 32)
    return [next(data) for _ in range(n)]


@pytest.mark.parametrize("width", [32, 256])
def test_weights_swapped_through_data_between_steps_are_recorded_true(tmp_path, width):
    # An EMA swap or weight surgery writes through `.data`, which no version counter sees. Each
    # step's recorded norms must be those of the weights that step produced, checked by brute force
    # at every step, whatever the loop writes into them afterwards.
    model = make_model(seed=4, d_model=width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    named = dict(model.named_parameters())
    other = {n: torch.randn_like(p) for n, p in named.items()}
    before: list[dict[str, torch.Tensor]] = []
    after: list[dict[str, torch.Tensor]] = []

    def snap_before(i: int) -> None:
        before.append({n: p.detach().clone() for n, p in named.items()})

    def swap(i: int) -> None:
        after.append({n: p.detach().clone() for n, p in named.items()})
        for n, p in named.items():  # surgery through .data: zero, then write other weights in
            p.data.mul_(0)
            p.data.copy_(other[n] if i % 2 == 0 else after[-1][n])

    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        train(model, opt, 12, before_step=snap_before, after_step=swap)
    run = spikedoc.load(tmp_path / "run")
    layers = run.layers()
    recorded = sorted(set(run.steps["step"]))
    assert monitor.dropped_rows == (12 - len(recorded)) * (1 + len(named))
    for step in recorded:
        rows = layers[layers["step"] == step].set_index("name")
        total = torch.sqrt(sum(after[step][n].double().square().sum() for n in named)).item()
        assert run.steps.set_index("step").loc[step, "param_norm"] == pytest.approx(total, rel=1e-5)
        for n in named:
            assert rows.loc[n, "param_norm"] == pytest.approx(after[step][n].norm().item(), rel=1e-5), (step, n)
            if not np.isnan(rows.loc[n, "update_norm"]):
                diff = (after[step][n].double() - before[step][n].double()).norm().item()
                norm_before = before[step][n].norm().item()
                assert rows.loc[n, "update_norm"] == pytest.approx(diff, rel=1e-3, abs=2e-7 * norm_before), (step, n)
                if norm_before > 0:
                    assert rows.loc[n, "update_ratio"] == pytest.approx(diff / norm_before, rel=1e-3, abs=1e-9), (step, n)
