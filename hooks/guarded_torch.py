"""A plain PyTorch training loop under spikedoc.Guard: bad steps vetoed, damage rolled back, recorded.

The loop of `hooks/plain_torch.py`, with the data handed out by the guard (so a rollback can replay
it) and `--nan-at` planting non-finite gradients on a few steps to watch the guard act.

    python hooks/guarded_torch.py --run-dir runs/guarded --steps 300 --nan-at 150
    spikedoc analyze runs/guarded
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402
from hooks.plain_torch import CharTransformer, text_ids  # noqa: E402


class Windows(torch.utils.data.Dataset):
    """Fixed windows of the text (a map-style dataset: the guard makes its shuffled order replayable)."""

    def __init__(self, ids: torch.Tensor, n: int = 20_000, seq_len: int = 64) -> None:
        self.ids, self.seq_len = ids, seq_len
        self.starts = torch.randint(len(ids) - seq_len - 1, (n,), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ids[int(self.starts[i]) : int(self.starts[i]) + self.seq_len + 1]
        return {"input_ids": row[:-1], "labels": row[1:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run and its checkpoints")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--nan-at", type=int, default=None, help="first of 5 steps with NaN gradients (first pass only)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    ids, vocab = text_ids()
    model = CharTransformer(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(args.steps, 2))
    loader = torch.utils.data.DataLoader(Windows(ids), batch_size=16, shuffle=True)

    # The guard includes spikedoc.watch and clips gradients (clip=1.0): no clip_grad_norm_ in the loop.
    guard = spikedoc.Guard(model, optimizer, scheduler=scheduler, data=loader, run_dir=args.run_dir,
                           checkpoint_every=args.checkpoint_every, max_steps=args.steps)  # fmt: skip
    try:
        for step, batch in guard:
            loss = model(**batch)["loss"]  # the loss is picked up from the output
            loss.backward()
            if args.nan_at is not None and args.nan_at <= step < args.nan_at + 5 and not guard.rollbacks:
                for p in model.parameters():
                    p.grad.fill_(math.nan)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0:
                print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    except spikedoc.GuardStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(3) from None
    finally:
        guard.close()
    print(f"trained {guard.step} steps: {guard.vetoes} vetoed, {guard.rollbacks} rollbacks; recorded to {args.run_dir}")


if __name__ == "__main__":
    main()
