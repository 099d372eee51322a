"""A DDP training run under torchrun recorded by spikedoc: the same one call on every rank.

Each rank trains on its own random windows of Python's documentation text; gradients are averaged
by DistributedDataParallel; every rank writes its own `rank=N` partition of the run directory, so
`spikedoc analyze` can tell one rank's numerics from the model's.

    torchrun --standalone --nproc_per_node 2 hooks/torchrun_ddp.py --run-dir runs/ddp --steps 100
    spikedoc analyze runs/ddp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402
from hooks.plain_torch import CharTransformer, batches, text_ids  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run (all ranks)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # CPU; use "nccl" and a device per rank on GPUs
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank
    ids, vocab = text_ids()
    model = DDP(CharTransformer(vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    monitor = spikedoc.watch(model, optimizer, run_dir=args.run_dir)  # the one call, on every rank

    data = batches(ids, batch_size=8, seq_len=64, seed=rank)  # each rank its own data
    for step in range(args.steps):
        loss = model(**next(data))["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)

    monitor.close()
    if rank == 0:
        print(f"recorded {monitor.step} steps per rank to {args.run_dir}")
    dist.barrier()  # no rank tears the group down while another still works (gloo aborts on a vanished peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
