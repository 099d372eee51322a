"""Distributed runs recorded by `watch` on two gloo ranks: one partition per rank, the rank named by analyze."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import spikedoc
from tests.common.distributed import ddp_worker, fsdp_worker, one_process_twin, spawn, stop_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")


def test_ddp_ranks_write_their_own_partition_with_their_own_loss(tmp_path):
    reports = spawn(ddp_worker, tmp_path, steps=6)
    run = spikedoc.load(tmp_path / "run")
    steps = run.steps
    assert sorted(steps["rank"].unique()) == [0, 1] and (steps["segment"] == 0).all()
    assert run.meta["world_size"] == 2 and [s["segment"] for s in run.meta["segments"]] == [0]
    for rank, report in enumerate(reports):
        mine = steps[steps["rank"] == rank].sort_values("step")
        assert report["dropped"] == 0
        assert mine["loss"].to_numpy() == pytest.approx(report["losses"], rel=1e-6)
        assert mine["grad_norm"].to_numpy() == pytest.approx(report["norms"], rel=1e-5)
    # DDP averages gradients: both ranks measure the same norm, from different losses.
    assert reports[0]["norms"] == pytest.approx(reports[1]["norms"], rel=1e-6)
    assert reports[0]["losses"] != pytest.approx(reports[1]["losses"], rel=1e-3)


def test_a_resumed_ddp_run_agrees_on_one_new_segment(tmp_path):
    spawn(ddp_worker, tmp_path, steps=2)
    spawn(ddp_worker, tmp_path, steps=2)
    run = spikedoc.load(tmp_path / "run")
    assert sorted(run.steps.groupby(["rank", "segment"]).size().index.tolist()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [s["segment"] for s in run.meta["segments"]] == [0, 1]


def test_a_nan_on_one_rank_is_attributed_to_that_rank(tmp_path):
    spawn(ddp_worker, tmp_path, steps=70, nan_step=66, nan_rank=1)
    diagnosis = spikedoc.analyze(tmp_path / "run")
    incident = next(i for i in diagnosis.incidents if i.onset_step == 66)
    assert incident.cause == "numerics_rank"
    assert any("rank 1's loss went non-finite at step 66" in e for e in incident.evidence)


LAYER_STATS = ["grad_norm", "grad_max", "param_norm", "update_norm", "update_ratio", "nonfinite", "exp_avg_norm",
               "exp_avg_sq_mean", "exp_avg_sq_max", "eps_frac"]  # fmt: skip


def test_fsdp2_statistics_are_those_of_the_full_tensors_on_one_process(tmp_path):
    steps = 4
    reports = spawn(fsdp_worker, tmp_path, steps=steps)
    one_process_twin(tmp_path / "twin", steps)
    run, twin = spikedoc.load(tmp_path / "run"), spikedoc.load(tmp_path / "twin")
    for rank, report in enumerate(reports):
        assert report["dropped"] == 0
        assert report["gathers"] == steps  # one batched collective per recorded step, not one per tensor
        mine = run.steps[run.steps["rank"] == rank].sort_values("step")
        # The total grad norm is what clip_grad_norm_ returned on the sharded model.
        assert mine["grad_norm"].to_numpy() == pytest.approx(report["norms"], rel=1e-5)
        assert mine["loss"].to_numpy() == pytest.approx(report["losses"], rel=1e-6)
        for column in ("grad_norm", "param_norm", "update_norm", "clip_coef", "nonfinite_grads"):
            assert mine[column].to_numpy() == pytest.approx(twin.steps[column].to_numpy(), rel=1e-4, abs=1e-9), column
        layers = run.layers().query("rank == @rank").sort_values(["step", "name"]).reset_index(drop=True)
        expected = twin.layers().sort_values(["step", "name"]).reset_index(drop=True)
        assert list(layers["name"]) == list(expected["name"])
        for column in LAYER_STATS:
            assert layers[column].to_numpy() == pytest.approx(expected[column].to_numpy(), rel=2e-4, abs=1e-7), column
    mean_loss = (reports[0]["losses"][0] + reports[1]["losses"][0]) / 2
    assert twin.steps["loss"][0] == pytest.approx(mean_loss, rel=1e-5)


def test_an_incident_judged_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    reports = spawn(stop_worker, tmp_path, steps=60, nan_step=20)
    assert [r["own"] for r in reports] == [False, True]  # rank 0's own loss stayed healthy
    assert reports[0]["stopped_at"] == reports[1]["stopped_at"] is not None and reports[0]["stopped_at"] < 30
    assert reports[0]["verdict"] == reports[1]["verdict"] == "divergence"
    assert reports[0]["onset"] == reports[1]["onset"] == 20
    assert reports[0]["analysis_error"] is None  # rank 0 analysed the whole run, rank 1's partition included
