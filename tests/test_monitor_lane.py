"""The CPU worker lane: statistics computed off the training thread are the ones computed inline."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import spikedoc
from spikedoc.monitor._collect import run_job
from spikedoc.monitor._lane import InlineLane, WorkerLane
from tests.common.models import make_model, train

STEPS = 8


def _run(tmp_path, name: str, worker: bool, monkeypatch, **watch) -> spikedoc.Run:
    monkeypatch.setattr("spikedoc.monitor.monitor._CPU_WORKER", worker)
    model = make_model(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    with spikedoc.watch(model, opt, run_dir=tmp_path / name, **watch) as monitor:
        lane = type(monitor._lane)
        train(model, opt, STEPS)
    assert lane is (WorkerLane if worker else InlineLane)
    return spikedoc.load(tmp_path / name)


@pytest.mark.parametrize("watch", [{}, {"every": 2, "layer_every": 3}, {"clip": 0.5}])
def test_worker_lane_records_the_same_values_as_inline_statistics(tmp_path, monkeypatch, watch):
    inline = _run(tmp_path, "inline", False, monkeypatch, **watch)
    worker = _run(tmp_path, "worker", True, monkeypatch, **watch)
    # Inline, this small model's Adam update norm is the norm of a parameter copy's difference; on
    # the worker it is the closed form from the optimizer state: equal to float32 rounding.
    update = ["update_norm", "update_ratio"]
    timing = ["time", "step_time"]
    drop_steps = timing + ["update_norm"]
    pd.testing.assert_frame_equal(inline.steps.drop(columns=drop_steps), worker.steps.drop(columns=drop_steps))
    pd.testing.assert_frame_equal(inline.layers().drop(columns=update), worker.layers().drop(columns=update))
    np.testing.assert_allclose(worker.steps["update_norm"], inline.steps["update_norm"], rtol=2e-4)
    for column in update:
        np.testing.assert_allclose(worker.layers()[column], inline.layers()[column], rtol=2e-4, atol=1e-12)


def test_adam_update_norm_from_a_parameter_copy_matches_the_difference(tmp_path, monkeypatch):
    # The copy path (inline lanes: accelerators, or CPU without the worker) against brute force.
    from tests.common.brute import watched_run
    from tests.test_monitor import STEPS as N, _assert_update_norm, _layers_at

    monkeypatch.setattr("spikedoc.monitor.monitor._CPU_WORKER", False)
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
    # a step: that step's statistics may still be running and are then dropped, never recorded
    # half-read; the steps after the restore measure against the restored parameters.
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
    assert monitor.dropped_rows == (10 - len(recorded)) * (1 + len(named))
    assert {1, 2, 4, 5, 7, 8} <= recorded  # the two steps after every restore
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


def test_waiting_for_the_monitor_before_a_restore_keeps_every_step(tmp_path):
    model = make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    saved = copy.deepcopy(model.state_dict())
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:

        def restore(i: int) -> None:
            monitor.wait()
            model.load_state_dict(saved)

        train(model, opt, 6, after_step=restore)
    assert monitor.dropped_rows == 0
    assert spikedoc.load(tmp_path / "run").steps["step"].tolist() == list(range(6))


def test_a_tensor_changed_while_its_statistics_run_drops_that_step(tmp_path):
    model = make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = next(model.parameters())
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        st = monitor._cur
        with pytest.warns(RuntimeWarning, match="changed in place"):
            run_job(monitor, st, "step_post", lambda: p.mul_(1.0), [p])
            monitor._lane.join()
        assert st.broken
        untouched = monitor._new_step(99)
        run_job(monitor, untouched, "step_post", lambda: p.mul(1.0), [p])
        monitor._lane.join()
        assert not untouched.broken


def test_worker_lane_runs_jobs_in_order_and_survives_a_failing_job():
    lane, seen = WorkerLane(), []
    lane.submit(lambda: seen.append(1))
    lane.submit(lambda: math.sqrt(-1))  # raises ValueError inside the worker
    lane.submit(lambda: seen.append(2))
    lane.join()
    lane.close()
    assert seen == [1, 2]
    lane.submit(lambda: seen.append(3))  # after close: runs on the caller, not lost
    assert seen == [1, 2, 3]
    assert np.isfinite(lane.busy_seconds)


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
