"""A map-style dataset of real text windows and one guarded training loop, for the guard's tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import spikedoc
from tests.common.models import TinyOutput, char_text, make_model

__all__ = ["TextWindows", "MaskedLM", "loader", "build", "run_guarded", "fill_grads_with_nan", "nan_grads", "garbage"]


class TextWindows(torch.utils.data.Dataset):
    """Item i: a fixed window of Python's documentation as (input_ids, labels), with its index as id."""

    def __init__(self, n: int = 2000, seq_len: int = 32) -> None:
        text = char_text()
        gen = torch.Generator().manual_seed(0)
        self.ids = text.ids
        self.starts = torch.randint(len(text.ids) - seq_len - 1, (n,), generator=gen).tolist()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.starts[i]
        row = self.ids[s : s + self.seq_len + 1]
        return {"input_ids": row[:-1], "labels": row[1:], "idx": i}


class MaskedLM(torch.nn.Module):
    """A character model whose causal mask is a `-inf` buffer, built as `nn.Transformer` builds it."""

    def __init__(self, seed: int = 0, d_model: int = 32, seq_len: int = 32) -> None:
        super().__init__()
        torch.manual_seed(seed)
        vocab = char_text().vocab_size
        self.tok = torch.nn.Embedding(vocab, d_model)
        self.pos = torch.nn.Embedding(seq_len, d_model)
        layer = torch.nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq_len))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> TinyOutput:
        T = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(T))  # (B, T, C)
        logits = self.head(self.encoder(x, mask=self.mask[:T, :T], is_causal=True))  # (B, T, vocab)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return TinyOutput(logits=logits, loss=loss)


def loader(n: int = 2000, batch_size: int = 8, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader over `TextWindows` (no generator of its own: the guard gives it one)."""
    return torch.utils.data.DataLoader(TextWindows(n), batch_size=batch_size, shuffle=True, **kwargs)


def build(seed: int = 0, lr: float = 3e-3, warmup: int = 20) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """Tiny transformer, AdamW and a warmup LambdaLR."""
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return model, opt, sched


def run_guarded(
    run_dir: Path,
    *,
    steps: int,
    data: Any = None,
    fault: Callable[[int, Any, dict[str, Any]], dict[str, Any]] | None = None,
    after_backward: Callable[[int, Any], None] | None = None,
    on_step: Callable[[Any, int, dict[str, Any]], None] | None = None,
    parts: tuple[torch.nn.Module, torch.optim.Optimizer, Any] | None = None,
    **options: Any,
) -> tuple[Any, list[tuple[int, list[int]]]]:
    """Train under a Guard; returns the (closed) guard and the (step, sample ids) of every batch handed out.

    `fault(step, guard, batch)` may replace the batch, `after_backward(step, guard)` may change the
    gradients, `on_step(guard, step, batch)` sees every batch before the forward.
    """
    model, opt, sched = parts or build()
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=data if data is not None else loader(), run_dir=run_dir,
                           max_steps=steps, **options)  # fmt: skip
    seen: list[tuple[int, list[int]]] = []
    try:
        for step, batch in guard:
            if on_step is not None:
                on_step(guard, step, batch)
            if fault is not None:
                batch = fault(step, guard, batch)
            seen.append((step, batch["idx"].tolist()))
            # A batch may carry a loss weight: summed over its tokens instead of averaged, as a
            # sentence-averaged objective weighs a batch of very long sequences.
            loss = model(batch["input_ids"], labels=batch["labels"]).loss * batch.get("loss_weight", 1.0)
            guard.record(loss=loss, sample_ids=batch["idx"])
            loss.backward()
            if after_backward is not None:
                after_backward(step, guard)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    finally:
        guard.close()
    return guard, seen


def fill_grads_with_nan(model: torch.nn.Module) -> None:
    """Every gradient NaN: the step a broken batch or device would produce."""
    for p in model.parameters():
        p.grad.fill_(math.nan)


def nan_grads(steps: set[int], *, first_pass_only: bool = True) -> Callable[[int, Any], None]:
    """An `after_backward` for `run_guarded`: NaN gradients at `steps` (before the first rollback only, by default)."""

    def after_backward(step: int, guard: Any) -> None:
        if step in steps and (guard.rollbacks == 0 or not first_pass_only):
            fill_grads_with_nan(guard.model)

    return after_backward


def garbage(batch: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Uniform random tokens (a corrupt shard) whose loss is summed over the tokens, not averaged."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab_size, batch["input_ids"].shape, generator=gen)
    return {**batch, "input_ids": ids, "labels": ids.roll(1, dims=1), "loss_weight": float(ids.shape[1])}
