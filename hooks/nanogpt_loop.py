"""A training loop in the shape of nanoGPT's `train.py`, recorded by spikedoc with one added line.

The parts of nanoGPT a monitor has to cope with: a model that returns `(logits, loss)`, an LR set by
hand each iteration (`param_group['lr'] = get_lr(it)`), `get_batch` drawing random offsets from a
token array, a GradScaler (disabled on CPU, as nanoGPT's is without float16), gradient accumulation
micro-steps, `clip_grad_norm_`, and one `ckpt.pt` overwritten at each eval whose val loss is the
best so far. A tiny GPT on the bytes of Python's documentation, on CPU, in seconds.

    python hooks/nanogpt_loop.py --out-dir out --run-dir runs/nano --max-iters 300
    spikedoc analyze runs/nano

`--fault` plants one fault, to see what the doctor says: `lr_surge` (the LR times `--fault-factor`
for `--fault-iters` iterations), `nan_loss` (`loss * nan` in one micro-step's backward), `nan_grad`
(one gradient element NaN). `--record-checkpoints` adds a second line, `monitor.event("checkpoint",
...)` after each save, so that the doctor's rollback advice can name the file.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)  # (B, T, C)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's interface: `forward(idx, targets) -> (logits, loss)`."""

    def __init__(self, vocab_size: int = 256, block_size: int = 32, n_layer: int = 2, n_head: int = 2, n_embd: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)
        for block in self.h:
            x = block(x, causal)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def token_arrays() -> tuple[np.ndarray, np.ndarray]:
    """train and val token arrays (bytes of Python's documentation), as nanoGPT's prepare.py writes them."""
    from pydoc_data.topics import topics

    data = np.frombuffer("".join(topics[k] for k in sorted(topics)).encode(), dtype=np.uint8).astype(np.uint16)
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, help="where ckpt.pt is written")
    p.add_argument("--run-dir", required=True, help="where spikedoc writes the run")
    p.add_argument("--max-iters", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--fault", choices=("none", "lr_surge", "nan_loss", "nan_grad"), default="none")
    p.add_argument("--fault-iter", type=int, default=150)
    p.add_argument("--fault-iters", type=int, default=12, help="lr_surge: iterations the surge lasts")
    p.add_argument("--fault-factor", type=float, default=30.0, help="lr_surge: the LR multiplier")
    p.add_argument("--record-checkpoints", action="store_true", help="add monitor.event('checkpoint', ...) after each save")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small model: one thread is fastest on a shared CPU
    train_data, val_data = token_arrays()
    block_size, batch_size = args.block_size, args.batch_size

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])  # (B, T)
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it: int) -> float:  # linear warmup, cosine decay to min_lr
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        ratio = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (args.learning_rate - args.min_lr)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            out[split] = float(torch.stack([model(*get_batch(split))[1] for _ in range(args.eval_iters)]).mean())
        model.train()
        return out

    model = GPT(block_size=block_size, n_layer=args.n_layer, n_embd=args.n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT: enabled only for float16
    monitor = spikedoc.watch(model, optimizer, run_dir=args.run_dir, scaler=scaler)  # the one added line
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    fault_end = args.fault_iter + (args.fault_iters if args.fault == "lr_surge" else 1)

    best_val_loss = 1e9
    X, Y = get_batch("train")
    for iter_num in range(args.max_iters):
        surging = args.fault == "lr_surge" and args.fault_iter <= iter_num < fault_end
        lr = get_lr(iter_num) * (args.fault_factor if surging else 1.0)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % args.eval_interval == 0:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                                "best_val_loss": best_val_loss}, ckpt_path)
                    if args.record_checkpoints:
                        monitor.event("checkpoint", path=ckpt_path)  # holds the state a resume re-runs iter_num from
        for micro_step in range(args.gradient_accumulation_steps):
            logits, loss = model(X, Y)
            loss = loss / args.gradient_accumulation_steps
            if args.fault == "nan_loss" and iter_num == args.fault_iter and micro_step == 0:
                loss = loss * float("nan")
            X, Y = get_batch("train")  # prefetch, as nanoGPT does
            scaler.scale(loss).backward()
        if args.fault == "nan_grad" and iter_num == args.fault_iter:
            model.h[0].mlp[0].weight.grad[0, 0] = float("nan")
        if args.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    monitor.close()
    print(f"recorded {monitor.step} iterations to {args.run_dir}")


if __name__ == "__main__":
    main()
