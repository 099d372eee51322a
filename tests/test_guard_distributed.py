"""Two gloo ranks under DDP: one rank's NaN vetoes the step on both, one rank's rollback is everyone's,
and a resume starts from a checkpoint every rank has."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spikedoc

STEPS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import spikedoc

        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        data = [torch.randn(32, 8, generator=gen) for _ in range(200)]
        guard = spikedoc.Guard(model, opt, data=data, run_dir=Path(out) / "run", checkpoint_every=20, max_steps=STEPS)
        for step, x in guard:
            loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
            loss.backward()
            # Rank 1 alone sees a non-finite loss at step 30 (its gradients, averaged by DDP, stay finite).
            seen = torch.tensor(math.nan) if (rank == 1 and step == 30 and not guard.rollbacks) else loss
            guard.record(loss=seen)
            if rank == 0 and step == 45 and not guard.rollbacks:
                guard.request_rollback()  # rank 0 alone asks
            opt.step()
            opt.zero_grad()
        guard.close()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        # A rank that lost its newest checkpoint: every rank resumes from the newest they all have.
        if rank == 1:
            (Path(out) / "run" / "checkpoints" / f"step-{STEPS:08d}.rank1.pt").unlink()
        resumed = spikedoc.Guard(model, opt, data=data, run_dir=Path(out) / "run", checkpoint_every=20, resume=True)
        resumed_at = resumed.step
        resumed.close()
        result = {"vetoes": [a["step"] for a in guard.actions if a["kind"] == "veto"],
                  "rollbacks": [(a["from_step"], a["to_step"], a["reason"]) for a in guard.actions if a["kind"] == "rollback"],
                  "step": guard.step, "resumed_at": resumed_at,
                  "same_params": all(torch.equal(gathered[0], g) for g in gathered)}  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_veto_roll_back_and_resume_together(tmp_path):
    ctx = mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # a hung rank fails the test instead of hanging it
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise AssertionError("a rank hung: the ranks did not agree")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["vetoes"] == [30]
        assert result["rollbacks"] == [[46, 40, "requested"]]
        assert result["step"] == STEPS and result["same_params"]
        assert result["resumed_at"] == 40
    events = spikedoc.load(tmp_path / "run").events
    rollbacks = events.loc[events["kind"] == "rollback"]
    assert sorted(rollbacks["rank"]) == [0, 1] and rollbacks["segment"].nunique() == 1  # one replay segment
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "step-00000040.rank0.pt" in checkpoints and "step-00000040.rank1.pt" in checkpoints
