"""A tiny decoder-only transformer and real English text for tests: one step takes milliseconds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TinyConfig",
    "TinyOutput",
    "TinyTransformer",
    "LogitsTransformer",
    "lm_loss",
    "CharText",
    "char_text",
    "make_model",
    "train",
]


@dataclass(kw_only=True)
class TinyConfig:
    """Shape of the test transformer; the defaults have ~27k parameters."""

    vocab_size: int = 128
    """Characters in the vocabulary (set from the text)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads; must divide `d_model`."""
    d_model: int = 32
    """Residual stream width."""
    seq_len: int = 32
    """Longest sequence the position embedding covers."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"TinyConfig: d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


@dataclass
class TinyOutput:
    """What the model returns: HF-style, with `.loss` set when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        d = cfg.d_model
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # causal
        if attention_mask is not None:  # padded keys are never attended to
            mask = mask & attention_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """GPT-style character model: token + position embeddings, pre-norm blocks, tied-free head."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> TinyOutput:
        T = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x, attention_mask)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return TinyOutput(logits=logits, loss=loss)


class LogitsTransformer(TinyTransformer):
    """The tiny transformer as most models are written: `forward` returns logits, the loop computes the loss."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids).logits  # (B, T, vocab)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-character cross entropy of `(B, T, vocab)` logits against `(B, T)` labels."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


class CharText:
    """The English text of Python's own documentation, as character ids, cut into batches."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, index: int, batch_size: int = 8, seq_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index` (deterministic): (input_ids, labels), each (batch_size, seq_len)."""
        gen = torch.Generator().manual_seed(1_000_003 * index + 17)
        starts = torch.randint(len(self.ids) - seq_len - 1, (batch_size,), generator=gen)
        rows = torch.stack([self.ids[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def batches(
        self, batch_size: int = 8, seq_len: int = 32, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of batches `start`, `start + 1`, ..."""
        index = start
        while True:
            yield self.batch(index, batch_size, seq_len)
            index += 1


@lru_cache(maxsize=1)
def char_text() -> CharText:
    """The text of `pydoc_data.topics` (Python's own docs), joined in a fixed order."""
    from pydoc_data.topics import topics

    return CharText("".join(topics[k] for k in sorted(topics)))


def make_model(seed: int = 0, *, logits_only: bool = False, **overrides: int) -> TinyTransformer:
    """A freshly initialised tiny transformer sized to the text's vocabulary (`LogitsTransformer` with `logits_only`)."""
    torch.manual_seed(seed)
    cfg = TinyConfig(**{"vocab_size": char_text().vocab_size, **overrides})
    return (LogitsTransformer if logits_only else TinyTransformer)(cfg)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    batch_size: int = 8,
    seq_len: int = 32,
    accumulate: int = 1,
    start: int = 0,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train `steps` optimizer steps on the real text; returns the mean loss of each step.

    `before_step(i)` runs after backward and before `optimizer.step()`, `after_step(i)` after it
    (before `zero_grad`), so tests can snapshot gradients and parameters around the step.
    """
    data = char_text().batches(batch_size, seq_len, start=start * accumulate)
    losses = []
    for i in range(steps):
        total = 0.0
        for _ in range(accumulate):
            input_ids, labels = next(data)
            loss = model(input_ids, labels=labels).loss
            (loss / accumulate).backward()
            total += loss.item() / accumulate
        if before_step is not None:
            before_step(i)
        optimizer.step()
        if after_step is not None:
            after_step(i)
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses

