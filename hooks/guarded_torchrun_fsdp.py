"""An FSDP2 (`fully_shard`) training run under spikedoc.Guard on every rank: the full gradient's norm
judged, sharded checkpoints (torch.distributed.checkpoint), the ranks vetoing and rolling back together.

The loop of `hooks/torchrun_fsdp.py` with the data handed out by the guard (each rank its own part
through a DistributedSampler) and `--nan-at` planting NaN gradients on rank 1 alone for five steps,
to watch both ranks veto them and roll back.

    torchrun --standalone --nproc_per_node 2 hooks/guarded_torchrun_fsdp.py --run-dir runs/gfsdp --nan-at 60
    spikedoc analyze runs/gfsdp
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402
from hooks.guarded_torch import Windows  # noqa: E402
from hooks.plain_torch import CharTransformer, text_ids  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run and its checkpoints (all ranks)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps to train")
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--nan-at", type=int, default=None, help="first of 5 steps with NaN gradients on rank 1 (first pass only)")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # CPU; use "nccl" and a device per rank on GPUs
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids, vocab = text_ids()
    model = CharTransformer(vocab)
    for layer in model.blocks.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = Windows(ids)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=torch.utils.data.DistributedSampler(data, seed=0))

    # The same call on every rank; the guard clips the full gradients (clip=1.0): no clip_grad_norm_ here.
    guard = spikedoc.Guard(model, optimizer, data=loader, run_dir=args.run_dir,
                           checkpoint_every=args.checkpoint_every, max_steps=args.steps)  # fmt: skip
    try:
        for step, batch in guard:
            loss = model(**batch)["loss"]
            loss.backward()
            if rank == 1 and args.nan_at is not None and args.nan_at <= step < args.nan_at + 5 and not guard.rollbacks:
                for p in model.parameters():
                    p.grad.to_local().fill_(math.nan)  # this rank's shards only
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rank == 0 and step % 20 == 0:
                print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    except spikedoc.GuardStopped as stop:
        print(f"rank {rank} stopped: {stop}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        guard.close()
    print(f"rank {rank}: trained {guard.step} steps: {guard.vetoes} vetoed, {guard.rollbacks} rollbacks", flush=True)
    dist.barrier()  # no rank tears the group down while another still works (gloo aborts on a vanished peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
