"""A tiny byte-level GPT trained on CPU with `spikedoc.watch`, healthy or with one planted fault.

The runs of the spike suite (`SPECS`; bench/spike_suite.py holds their labels and scoring, and
sample_runs/ the recorded runs) and of `spikedoc demo`.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import spikedoc

__all__ = ["PAD", "Recipe", "RunSpec", "SPECS", "corpus", "generate_run"]

PAD = 256
"""Padding id: one past the 256 byte values, so that any byte (NUL included) can be data."""


@dataclass(kw_only=True)
class Recipe:
    """The training recipe every run of the suite shares (justified in sample_runs/README.md)."""

    steps: int = 300
    """Optimizer steps per run."""
    batch: int = 32
    """Sequences per step."""
    min_len: int = 8
    """Shortest sequence, in bytes."""
    max_len: int = 64
    """Longest ordinary sequence, in bytes; the position table is longer (see `context`)."""
    context: int = 512
    """Rows of the learned position table: the longest sequence the model accepts."""
    d_model: int = 32
    n_head: int = 2
    n_layer: int = 2
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """torch's AdamW defaults."""
    weight_decay: float = 0.1
    warmup: int = 30
    """Linear warmup steps, then cosine decay to `min_lr_ratio * lr` at the last step."""
    min_lr_ratio: float = 0.1
    checkpoint_every: int = 50
    bias: bool = False
    """Biases in the linear and LayerNorm layers (their Adam second moments drift down as the
    model converges: the healthy optimizer-state drift a precursor test must not mistake for a cause)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "min_len", "max_len", "context", "d_model", "n_head", "n_layer",
                     "warmup", "checkpoint_every"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Recipe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 2 <= self.min_len <= self.max_len <= self.context:
            raise ValueError("Recipe: need 2 <= min_len <= max_len <= context")
        if self.d_model % self.n_head:
            raise ValueError(f"Recipe.n_head ({self.n_head}) must divide d_model ({self.d_model})")

    def lr_at(self, step: int) -> float:
        """Learning rate of `step`: linear warmup, then cosine decay to the floor."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - 1 - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(kw_only=True)
class RunSpec:
    """One run of the suite: a fault (or none), the step it is planted at, and its true cause."""

    name: str
    fault: str | None
    """None, `constant_batch`, `long_batch`, `random_batch`, `mixed_batch`, `lr_jump`, `lr_surge`,
    `inf_weight`, `zero_exp_avg_sq`, `reset_resume`."""
    step: int = 0
    """Step at which the fault is planted."""
    seed: int = 0
    """Seed of the initialisation and the data stream; every faulty run uses the clean run's 0."""
    lr_factor: float = 10.0
    """`lr_jump` and `lr_surge`: the factor the learning rate is multiplied by from `step` on."""
    surge_steps: int = 0
    """`lr_surge` only: steps the multiplied learning rate lasts before the schedule resumes."""
    twin: str = "clean"
    """The healthy run this one is compared with (same seed, data and recipe, no fault)."""
    bias: bool = False
    """Train with `Recipe.bias` (and compare with a twin that does too)."""
    cause: str = "unknown"
    """The true cause, in spikedoc's vocabulary (`spikedoc.analysis.incident.CAUSES`)."""
    description: str = ""


SPECS: tuple[RunSpec, ...] = (
    RunSpec(name="clean", fault=None, description="Healthy run: AdamW, warmup then cosine decay, no fault."),
    *(RunSpec(name=f"clean_seed{seed}", fault=None, seed=seed,
              description=f"Healthy run as `clean`, with seed {seed} for the initialisation and the data.")
      for seed in (1, 2, 3)),
    RunSpec(name="clean_bias", fault=None, bias=True,
            description="Healthy run as `clean`, with biases in the linear and LayerNorm layers."),
    RunSpec(name="bad_batch_constant", fault="constant_batch", step=140, cause="bad_batch",
            description="The batch of step 140 is near-constant input: every sequence is NUL bytes "
                        "(a zero-filled region of a corrupt shard), at the step's ordinary lengths."),
    RunSpec(name="bad_batch_long", fault="long_batch", step=170, cause="bad_batch",
            description="The batch of step 170 holds 32 machine-generated sequences of 512 bytes "
                        "(base64 blobs, 14x the run's median length); under sentence-averaged loss "
                        "their gradient is two orders of magnitude above the run's."),
    RunSpec(name="lr_jump", fault="lr_jump", step=160, cause="lr_schedule",
            description="From step 160 the learning rate is 10x the schedule's: an LR-schedule "
                        "discontinuity such as a resume that rebuilt the scheduler with the wrong base LR."),
    RunSpec(name="lr_surge", fault="lr_surge", step=150, lr_factor=20.0, surge_steps=5, cause="lr_schedule",
            description="For the 5 steps from 150 the learning rate is 20x the schedule's, then the schedule "
                        "resumes (a scheduler bug that lasts a few steps): the loss spikes, comes down, and stays "
                        "above the clean run's."),
    RunSpec(name="bad_batch_random", fault="random_batch", step=220, cause="bad_batch", twin="clean_bias", bias=True,
            description="In a run with biases, whose bias tensors' Adam second moments drift down as it trains, "
                        "the batch of step 220 is uniformly random bytes: a one-step spike that leaves no damage."),
    RunSpec(name="minor_blip", fault="mixed_batch", step=260, cause="bad_batch",
            description="Late in the run, 6 of the 32 sequences of the batch of step 260 are random bytes: a "
                        "small one-step rise of the batch's loss, a minor incident."),
    RunSpec(name="nan", fault="inf_weight", step=200, cause="numerics_rank",
            description="Before step 200 one weight element (blocks.1.fc.weight[3, 5]) becomes inf, "
                        "as a memory or numerics fault would: the loss is NaN from step 200 on."),
    RunSpec(name="optimizer_state", fault="zero_exp_avg_sq", step=150, cause="optimizer_state",
            description="Before step 150 Adam's exp_avg_sq is zeroed for every tensor while exp_avg and "
                        "the step count are kept (a checkpoint converter that lost the second moments)."),
    RunSpec(name="state_reset", fault="reset_resume", step=150, cause="state_reset",
            description="The run stops after the checkpoint at step 150 and resumes (a new segment) "
                        "with the step count, LR schedule and data position restored but a freshly "
                        "initialised model and optimizer: the state_dicts were never loaded."),
)  # fmt: skip


# ------------------------------------------------------------------------------------ data, model


def corpus() -> bytes:
    """Python's own documentation topics (`pydoc_data.topics`), sorted by topic, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics)).encode("utf-8")


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int, bias: bool = False) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # Sequences are right-padded, so the causal mask already keeps real tokens off the padding.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _TinyGPT(nn.Module):
    """Byte-level GPT (nanoGPT layout, no biases, tied embeddings); returns per-token losses."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        d = recipe.d_model
        self.wte = nn.Embedding(PAD + 1, d)
        self.wpe = nn.Embedding(recipe.context, d)
        self.blocks = nn.ModuleList(_Block(d, recipe.n_head, recipe.bias) for _ in range(recipe.n_layer))
        self.ln_f = nn.LayerNorm(d, bias=recipe.bias)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits (B, T, V) of every position (for loops that compute the loss themselves)."""
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.logits(input_ids)  # (B, T, V)
        mask = attention_mask[:, 1:].to(logits.dtype)  # (B, T-1): a next token exists
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
        return nll.view_as(mask) * mask  # (B, T-1), zero on padding


class _Stream:
    """Deterministic batches of random corpus slices with random lengths, right-padded."""

    def __init__(self, recipe: Recipe, data: torch.Tensor, seed: int) -> None:
        self.recipe, self.data = recipe, data
        self.gen = torch.Generator().manual_seed(seed + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        r = self.recipe
        lengths = torch.randint(r.min_len, r.max_len + 1, (r.batch,), generator=self.gen)
        offsets = torch.randint(0, len(self.data) - r.max_len, (r.batch,), generator=self.gen)
        rows = [self.data[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
        ids = [f"topics@{o}+{n}" for o, n in zip(offsets.tolist(), lengths.tolist())]
        return (*_pad(rows, int(lengths.max())), ids)


def _pad(rows: list[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


#: Faults that replace the batch of the planted step.
_BATCH_FAULTS = ("constant_batch", "long_batch", "random_batch", "mixed_batch")


def _planted_batch(spec: RunSpec, recipe: Recipe, ids: torch.Tensor, mask: torch.Tensor,
                   sample_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # fmt: skip
    """The batch that replaces the ordinary one at `spec.step` for the bad-batch faults."""
    if spec.fault == "constant_batch":  # same lengths as the batch it replaces, every byte NUL
        return torch.where(mask.bool(), 0, PAD), mask, [f"shard7/zero-fill/{i}" for i in range(len(mask))]
    if spec.fault in ("random_batch", "mixed_batch"):  # uniformly random bytes at the batch's own lengths
        noise = torch.randint(0, 256, mask.shape, generator=torch.Generator().manual_seed(98))
        noisy = len(mask) if spec.fault == "random_batch" else 6  # the first `noisy` sequences
        mixed = torch.where(mask.bool(), noise, PAD)
        mixed[noisy:] = ids[noisy:]
        names = [f"crawl/noise-{i}" if i < noisy else sample_ids[i] for i in range(len(mask))]
        return mixed, mask, names
    # base64 of seeded random bytes: what a data: URI or an inlined binary looks like in crawled text
    raw = torch.randint(0, 256, (recipe.batch * recipe.context,), generator=torch.Generator().manual_seed(99))
    blob = base64.b64encode(raw.to(torch.uint8).numpy().tobytes())[: recipe.batch * recipe.context]
    ids = torch.tensor(list(blob), dtype=torch.long).view(recipe.batch, recipe.context)
    return ids, torch.ones_like(ids), [f"crawl/blob-{i}" for i in range(recipe.batch)]


# ------------------------------------------------------------------------------------ generation


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels and a fixed seed; restores the process settings after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
        torch.set_rng_state(rng)


def _fresh(recipe: Recipe, seed: int) -> tuple[_TinyGPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _TinyGPT(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    return model, optimizer


def generate_run(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    recipe: Recipe | None = None,
    max_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
    watch_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one run of the suite into `run_dir` (replaced if present) and return its raw record.

    Args:
        spec: which run (the suite's are `SPECS`).
        run_dir: the spikedoc run directory to write.
        recipe: the shared training recipe; None for the suite's.
        max_steps: stop early (the schedule still spans `recipe.steps`), for quick determinism checks.
        checkpoint_dir: where the periodic checkpoints go (outside the repo); None for a temp dir.
        on_step: called with (steps done, steps in all) after each step (a progress bar).
        watch_options: more keyword arguments for `spikedoc.watch` (e.g. `{"budget": 0.02}`).

    Returns:
        `{"loss": [...], "planted": {"steps": [...], "sample_ids": [...]}}`, losses as recorded.

    Example:
        >>> record = generate_run(RunSpec(name="clean", fault=None), "/tmp/clean", max_steps=5)  # doctest: +SKIP
        >>> len(record["loss"])  # doctest: +SKIP
        5
    """
    recipe = recipe or Recipe()
    if spec.bias and not recipe.bias:
        recipe = replace(recipe, bias=True)
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    ckpt = Path(checkpoint_dir or Path(tempfile.gettempdir()) / "spikedoc-spike-suite") / spec.name
    ckpt.mkdir(parents=True, exist_ok=True)
    stop = recipe.steps if max_steps is None else min(max_steps, recipe.steps)
    losses: list[float] = []
    planted: dict[str, list[Any]] = {"steps": [], "sample_ids": []}
    with _deterministic(spec.seed):
        stream = _Stream(recipe, torch.tensor(list(corpus()), dtype=torch.long), spec.seed)
        model, optimizer = _fresh(recipe, spec.seed)
        # A reference recording: every statistic on every step, whatever it costs on this CPU.
        options = {"layer_every": 1, "budget": None, **(watch_options or {})}
        monitor = spikedoc.watch(model, optimizer, run_dir=run_dir, **options)
        try:
            for step in range(stop):
                if spec.fault == "reset_resume" and step == spec.step:
                    # The restart: a new process would rebuild model and optimizer and load their
                    # state_dicts from the checkpoint; this one forgets to.
                    monitor.close()
                    model, optimizer = _fresh(recipe, spec.seed + 1000)
                    monitor = spikedoc.watch(model, optimizer, run_dir=run_dir, start_step=step, **options)
                    planted["steps"].append(step)
                losses.append(_train_step(spec, recipe, step, model, optimizer, monitor, stream, planted))
                if on_step is not None:
                    on_step(step + 1, stop)
                if (step + 1) % recipe.checkpoint_every == 0:
                    path = ckpt / f"step-{step + 1:06d}.pt"
                    # Written whole, then renamed: two processes making the same run share this file.
                    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, tmp)
                    os.replace(tmp, path)
                    monitor.event("checkpoint", path=str(path))  # step + 1: the step a resume re-runs
        finally:
            monitor.close()
    return {"loss": losses, "planted": planted}


def _train_step(spec: RunSpec, recipe: Recipe, step: int, model: _TinyGPT, optimizer: torch.optim.Optimizer,
                monitor: Any, stream: _Stream, planted: dict[str, list[Any]]) -> float:  # fmt: skip
    ids, mask, sample_ids = stream.next()  # always drawn, so later steps see the clean run's data
    at_fault = step == spec.step
    if at_fault and spec.fault in _BATCH_FAULTS:
        ids, mask, sample_ids = _planted_batch(spec, recipe, ids, mask, sample_ids)
        planted["steps"].append(step)
        planted["sample_ids"].extend(sample_ids)
    surging = spec.fault == "lr_surge" and spec.step <= step < spec.step + spec.surge_steps
    lr = recipe.lr_at(step) * (spec.lr_factor if (spec.fault == "lr_jump" and step >= spec.step) or surging else 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if at_fault and spec.fault == "inf_weight":
        with torch.no_grad():
            model.blocks[1].fc.weight[3, 5] = math.inf
        planted["steps"].append(step)
    if at_fault and spec.fault == "zero_exp_avg_sq":
        for state in optimizer.state.values():
            state["exp_avg_sq"].zero_()
        planted["steps"].append(step)
    if at_fault and spec.fault in ("lr_jump", "lr_surge"):
        planted["steps"].append(step)
    nll = model(input_ids=ids, attention_mask=mask)  # (B, T-1)
    tokens = mask[:, 1:].sum(1).clamp(min=1)  # (B,)
    sample_losses = nll.detach().sum(1) / tokens
    token_mean = nll.detach().sum() / tokens.sum()
    monitor.record(loss=token_mean, sample_ids=sample_ids, sample_losses=sample_losses.tolist())
    # Sentence-averaged objective (fairseq's --sentence-avg): each sequence's summed token loss,
    # averaged over sequences, so a sequence's gradient grows with its length.
    (nll.sum() / len(ids)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(token_mean)
