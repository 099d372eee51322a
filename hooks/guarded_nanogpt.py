"""A training loop in the shape of nanoGPT's `train.py`, under spikedoc.Guard: four lines changed.

The loop keeps what nanoGPT's has: a model returning `(logits, loss)`, `get_batch` drawing random
offsets from the global RNG (and prefetching the next batch), the LR set by hand each iteration,
micro-step gradient accumulation, its own `clip_grad_norm_`, a GradScaler, periodic evaluation
and one `ckpt.pt`. The lines that differ from the unguarded loop end in `# spikedoc` (4 of them:
the import, the Guard, `get_batch = guard.draw`, and `while True:` become `for iter_num in
guard.steps():`). `--nan-at S` plants five steps of NaN gradients (first pass only) through a
gradient hook, outside the loop, to watch the guard veto them and roll back.

    python hooks/guarded_nanogpt.py --out-dir runs/nanogpt --max-iters 300 --nan-at 150
    spikedoc analyze runs/nanogpt

Exit codes: 0 trained, 3 the guard stopped the run (`GuardStopped`, its diagnosis on stderr).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402  # spikedoc
from hooks.plain_torch import CharTransformer, text_ids  # noqa: E402


class GPT(CharTransformer):
    """The character transformer with nanoGPT's interface: `model(idx, targets) -> (logits, loss)`."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):  # type: ignore[override]
        logits = super().forward(idx)["logits"]  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="ckpt.pt, and the guard's run (recording, checkpoints)")
    parser.add_argument("--max-iters", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="the guard's checkpoints")
    parser.add_argument("--nan-at", type=int, default=None, help="first of 5 steps with NaN gradients (first pass only)")
    args = parser.parse_args(argv)

    out_dir, max_iters, eval_interval, eval_iters, log_interval = args.out_dir, args.max_iters, args.eval_interval, 5, 50
    gradient_accumulation_steps, batch_size, block_size = 2, 12, 64
    learning_rate, min_lr, warmup_iters, lr_decay_iters, decay_lr, grad_clip = 3e-3, 3e-4, 20, max_iters, True, 1.0
    device, dtype = "cpu", "float32"
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(1337)
    torch.set_num_threads(1)
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    ids, vocab_size = text_ids()
    n = int(0.9 * len(ids))
    train_data, val_data = ids[:n], ids[n:]

    def get_batch(split):
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i : i + block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
        return x.to(device), y.to(device)

    iter_num = 0
    best_val_loss = 1e9
    model = GPT(vocab_size, seq_len=block_size).to(device)
    scaler = torch.amp.GradScaler(device, enabled=(dtype == "float16"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    guard = spikedoc.Guard(model, optimizer, data=get_batch, scaler=scaler, run_dir=out_dir, clip=None, checkpoint_every=args.checkpoint_every)  # spikedoc
    get_batch = guard.draw  # spikedoc
    if args.nan_at is not None:  # the planted fault, outside the loop
        model.head.weight.register_hook(lambda g: g * math.nan if args.nan_at <= guard.step < args.nan_at + 5 and not guard.rollbacks else g)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return min_lr + coeff * (learning_rate - min_lr)

    # training loop
    X, Y = get_batch("train")  # fetch the very first batch
    t0 = time.time()
    for iter_num in guard.steps():  # spikedoc
        lr = get_lr(iter_num) if decay_lr else learning_rate
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        if iter_num % eval_interval == 0:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "iter_num": iter_num, "best_val_loss": best_val_loss}  # fmt: skip
                    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))

        for micro_step in range(gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch("train")  # prefetch the next batch
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % log_interval == 0:
            print(f"iter {iter_num}: loss {loss.item() * gradient_accumulation_steps:.4f}, time {dt * 1000:.2f}ms", flush=True)
        iter_num += 1
        if iter_num > max_iters:
            break
    print(f"trained to step {guard.step}: {guard.vetoes} vetoed, {guard.rollbacks} rollbacks; recorded to {out_dir}")


if __name__ == "__main__":
    try:
        main()
    except spikedoc.GuardStopped as stop:  # the guard's clean stop: its diagnosis, one line, exit code 3
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(3) from None
