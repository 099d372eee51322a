"""The guard on two gloo ranks under FSDP2 (`fully_shard`): it judges the full gradient's norm, and a
fault on one rank rolls both back together from a sharded checkpoint (DCP on disk, or each rank's
shards in memory) that restores the state."""

from __future__ import annotations

import pytest
import torch

from tests.common.distributed import guard_fsdp_worker, spawn

FAULT = [10, 11, 12, 13, 14]
EVERY, STEPS = 8, 17


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], object]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    reports = spawn(guard_fsdp_worker, tmp, steps=STEPS, checkpoint_every=EVERY, fault_steps=FAULT, factor=1e3)
    return reports, tmp


def test_judged_norm_is_the_full_gradients_norm(runs):
    reports, _ = runs
    for report in reports:
        vetoes = report["disk"]["vetoes"]
        assert [step for step, _, _ in vetoes] == FAULT
        for step, judged, reasons in vetoes:  # rank 1's shards alone blown up: the norm of the whole
            assert "grad_norm_out_of_band" in reasons
            assert judged == pytest.approx(report["disk"]["brute"][str(step)], rel=1e-5)


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_a_fault_on_one_rank_rolls_both_back_together(runs, mode):
    reports, _ = runs
    for report in reports:
        assert report[mode]["rollbacks"] == [[FAULT[-1] + 1, EVERY, "vetoes"]]
        assert report[mode]["step"] == STEPS


def test_checkpoint_shards_are_written_with_dcp_beside_each_ranks_file(runs):
    _, tmp = runs
    checkpoints = tmp / "disk" / "checkpoints"
    assert (checkpoints / f"step-{EVERY:08d}.dcp" / ".metadata").is_file()
    rank_file = torch.load(checkpoints / f"step-{EVERY:08d}.rank1.pt", weights_only=True)
    assert all(t.device.type == "meta" for t in rank_file["model"].values())  # the shards live in DCP only


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_state_restored_equals_the_state_saved(runs, mode):
    reports, _ = runs
    assert all(report[mode]["restored_equals_saved"] for report in reports)


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_a_new_guard_resumes_from_the_newest_sharded_checkpoint(runs, mode):
    reports, _ = runs
    for report in reports:
        assert report[mode]["resumed_at"] == STEPS - STEPS % EVERY
        assert report[mode]["resumed_equals_saved"]
