"""The overhead benchmark's model and data: a small GPT-style character LM on Python's own docs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharGPT", "batches", "corpus"]


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(self.ln_1(x)).split(C, dim=2)
        )  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class CharGPT(nn.Module):
    """nanoGPT's shape (pre-norm blocks, learned positions, untied head) without dropout.

    `forward(idx, targets)` returns the scalar loss, so spikedoc captures it without a `record` call.

    Example:
        >>> model = CharGPT(vocab=10, n_layer=1, n_head=2, d_model=16, seq_len=8)
        >>> model(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)).shape
        torch.Size([])
    """

    def __init__(self, *, vocab: int, n_layer: int, n_head: int, d_model: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def corpus() -> tuple[torch.Tensor, int]:
    """The text of Python's docs (`pydoc_data.topics`, ships with CPython) as char ids, and the vocab size."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


def batches(
    data: torch.Tensor, *, n: int, batch_size: int, seq_len: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` (inputs, next-char targets) batches at random offsets, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(data) - seq_len - 1, (n, batch_size), generator=gen)
    out = []
    for row in starts:
        window = torch.stack([data[s : s + seq_len + 1] for s in row.tolist()])  # (B, T+1)
        out.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return out
