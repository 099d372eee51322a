"""The guard on two gloo ranks under FSDP2 (`fully_shard`): it judges the full gradient's norm, and a
fault on one rank rolls both back together from a sharded (DCP) checkpoint that restores the state."""

from __future__ import annotations

import math

import pytest
import torch

from tests.common.distributed import guard_fsdp_worker, spawn

FAULT = [15, 16, 17, 18, 19]


def _run(tmp_path, *, in_memory: bool) -> list[dict]:
    return spawn(guard_fsdp_worker, tmp_path, steps=24, checkpoint_every=10, in_memory=in_memory,
                 fault_steps=FAULT, factor=1e3)  # fmt: skip


@pytest.fixture(scope="module")
def from_disk(tmp_path_factory) -> tuple[list[dict], object]:
    tmp = tmp_path_factory.mktemp("fsdp2_disk")
    return _run(tmp, in_memory=False), tmp


def test_judged_norm_is_the_full_gradients_norm(from_disk):
    reports, _ = from_disk
    for report in reports:
        vetoes = report["vetoes"]
        assert [step for step, _, _ in vetoes] == FAULT
        for step, judged, reasons in vetoes:  # rank 1's shards alone blown up: the norm of the whole
            assert "grad_norm_out_of_band" in reasons
            assert judged == pytest.approx(report["brute"][str(step)], rel=1e-5)


def test_a_fault_on_one_rank_rolls_both_back_from_the_dcp_checkpoint(from_disk):
    reports, tmp = from_disk
    for report in reports:
        assert report["rollbacks"] == [[20, 10, "vetoes"]]
        assert report["step"] == 24
    checkpoints = tmp / "run" / "checkpoints"
    assert (checkpoints / "step-00000010.dcp" / ".metadata").is_file()
    rank_file = torch.load(checkpoints / "step-00000010.rank1.pt", weights_only=True)
    assert all(t.device.type == "meta" for t in rank_file["model"].values())  # the shards live in DCP only


def test_state_restored_from_disk_equals_the_state_saved(from_disk):
    reports, _ = from_disk
    assert all(report["restored_equals_saved"] for report in reports)


def test_state_restored_from_the_in_memory_shards_equals_the_state_saved(tmp_path):
    reports = _run(tmp_path, in_memory=True)
    for report in reports:
        assert report["rollbacks"] == [[20, 10, "vetoes"]]
        assert report["restored_equals_saved"]
