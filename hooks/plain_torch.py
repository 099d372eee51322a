"""A plain PyTorch training loop recorded by spikedoc: one call, the loop otherwise unchanged.

Trains a small character-level transformer on the English text of Python's own documentation.

    python hooks/plain_torch.py --run-dir runs/plain --steps 200
    spikedoc analyze runs/plain
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import spikedoc  # noqa: E402


class CharTransformer(nn.Module):
    """Decoder-only transformer over characters; returns the loss when given labels."""

    def __init__(self, vocab: int, d_model: int = 64, n_layer: int = 2, n_head: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_head, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        T = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        logits = self.head(self.blocks(x, mask=causal, is_causal=True))  # (B, T, vocab)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


def text_ids() -> tuple[torch.Tensor, int]:
    """Python's documentation text as character ids, and the vocabulary size."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
    """Endless random windows of the text: {"input_ids", "labels"}, each (batch_size, seq_len)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(ids) - seq_len - 1, (batch_size,), generator=gen)
        rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
        yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="where spikedoc writes the run")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to train")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (the loop's clip_grad_norm_)")
    parser.add_argument("--flush-every", type=int, default=100, help="step rows per Parquet part")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step (tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # small model: one thread is fastest on a shared CPU
    ids, vocab = text_ids()
    model = CharTransformer(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(args.steps, 2))

    # The one call. The loop's own clip_grad_norm_ below is observed: grad_norm is the norm before it.
    monitor = spikedoc.watch(model, optimizer, run_dir=args.run_dir, flush_every=args.flush_every)

    data = batches(ids, args.batch_size, seq_len=64)
    for step in range(args.steps):
        loss = model(**next(data))["loss"]  # the loss is picked up from the output
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    monitor.close()
    print(f"recorded {monitor.step} steps to {args.run_dir} ({monitor.dropped_rows} rows dropped)")


if __name__ == "__main__":
    main()
