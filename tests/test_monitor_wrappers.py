"""watch() through wrappers and plan changes: DDP, DataParallel, param groups added later."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import spikedoc
from tests.common.brute import watched_run
from tests.common.models import make_model, train


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_model_records_unprefixed_names_and_the_rank(tmp_path, one_process_group):
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    with spikedoc.watch(ddp, opt, run_dir=tmp_path / "run"):
        train(ddp, opt, 2)
    run = spikedoc.load(tmp_path / "run")
    assert set(run.layers()["name"]) == {n for n, _ in model.named_parameters()}
    assert run.meta["world_size"] == 1 and run.meta["rank"] == 0
    assert run.steps["micro_batches"].tolist() == [1, 1]


def test_data_parallel_model_records_unprefixed_names(tmp_path):
    model = make_model()
    wrapped = torch.nn.DataParallel(model)  # without GPUs it calls the module directly
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    with spikedoc.watch(wrapped, opt, run_dir=tmp_path):
        train(wrapped, opt, 2)
    assert set(spikedoc.load(tmp_path).layers()["name"]) == {n for n, _ in model.named_parameters()}


def test_param_group_added_after_watch_is_recorded_from_then_on(tmp_path):
    model = make_model()
    head = list(model.head.parameters())
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("head")], lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        train(model, opt, 2)
        opt.add_param_group({"params": head, "lr": 5e-4})
        train(model, opt, 2, start=2)
    run = spikedoc.load(tmp_path)
    per_step = run.layers().groupby("step")["name"].apply(set)
    assert "head.weight" not in per_step[1] and "head.weight" in per_step[2]
    assert run.steps["lr_1"].isna().tolist() == [True, True, False, False]
    assert run.steps["lr_1"][3] == pytest.approx(5e-4)


def test_optimizer_over_some_parameters_records_only_those(tmp_path):
    model = make_model()
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    run, copies = watched_run(model, torch.optim.SGD(params, lr=0.1, momentum=0.9), tmp_path, 2)
    names = set(run.layers()["name"])
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    np.testing.assert_allclose(run.steps["grad_norm"], [c.total_grad_norm for c in copies], rtol=1e-5)
