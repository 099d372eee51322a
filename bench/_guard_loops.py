"""The guard in the loops people write: a nanoGPT-shaped loop and a model with a `-inf` mask buffer, faults planted.

Two loops, each trained unguarded and under `spikedoc.Guard` at its defaults (but `checkpoint_every`):

- `nanogpt`: the shape of nanoGPT's `train.py` (`hooks/guarded_nanogpt.py`): a model returning
  `(logits, loss)`, `get_batch(split)` drawing random offsets from the global RNG with a prefetch,
  the LR set by hand each iteration (`param_group['lr'] = get_lr(it)`), micro-step accumulation, a
  GradScaler (disabled on CPU, as nanoGPT's is without float16), the loop's own `clip_grad_norm_`,
  periodic evaluation and one `ckpt.pt`. Under the guard: `Guard(..., data=get_batch, clip=None)`,
  `get_batch = guard.draw`, `for iter_num in guard.steps()`.
- `masked`: the guard's own iteration (`for step, batch in guard`) with a LambdaLR warmup + cosine
  schedule given as `scheduler=`, the guard's clip (1.0; `clip_grad_norm_(1.0)` unguarded), and a
  model whose causal mask is a `-inf` buffer (`nn.Transformer.generate_square_subsequent_mask`).

Faults, at `fault_step` (data faults at the data positions of that step's batches):

- `lr_surge`: the LR x`surge_factor` for `surge_steps` steps (the loop's own LR code or the
  LambdaLR): the schedule, so a replay meets it again;
- `corrupt_stretch`: `stretch` consecutive batches (data positions) of uniformly random bytes;
- `nan_batch`: one batch of padding only: under the models' hand-written masked token mean (the
  loss times a padding mask, over the mask's sum) its loss and every gradient are 0/0 = NaN; it is
  data, met again by a replay unless skipped;
- `optimizer_state`: Adam's `exp_avg_sq` zeroed for every tensor before the step, once;
- `optimizer_state_returning`: the same, every time the step is reached (replays included).

A data position is the index of a training draw (`get_batch` with gradients enabled, or the
re-iterable's batch index), the guard's own count: a sequential reader's shard. Random offsets
alone would scatter a corrupt region of the file over every batch; the stretch models a loader that
served tens of consecutive bad batches. `get_batch` counts its draws (the fresh ones drawn in place
of skipped batches included) and the loop rewinds that count with its own `iter_num` after a
rollback, so the same positions are corrupt on every pass.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import spikedoc
from hooks.nanogpt_loop import GPT, token_arrays

__all__ = ["HEALABLE", "LOOPS", "LOOP_FAULTS", "LoopConfig", "LoopRun", "MaskedGPT", "NanoGPT", "run_loops", "token_mean", "train_loop"]

LOOPS = ("nanogpt", "masked")
LOOP_FAULTS = ("clean", "lr_surge", "corrupt_stretch", "nan_batch", "optimizer_state", "optimizer_state_returning")
#: Faults the guard is expected to heal (the returning one must stop cleanly or heal).
HEALABLE = ("lr_surge", "corrupt_stretch", "nan_batch", "optimizer_state")
_PAD = -1  # a target that carries no loss (nanoGPT's ignore_index)


@dataclass(kw_only=True)
class LoopConfig:
    """Sizes, schedule and where the faults go."""

    steps: int = 300
    """Optimizer steps per run."""
    fault_step: int = 150
    """Step of every fault (its first, for the surge and the stretch)."""
    checkpoint_every: int = 50
    """The guard's checkpoint interval."""
    batch: int = 8
    """Rows per micro-batch."""
    block: int = 32
    """Tokens per row."""
    accum: int = 2
    """nanogpt: micro-steps per optimizer step (masked: 1)."""
    n_layer: int = 2
    n_embd: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    surge_factor: float = 30.0
    surge_steps: int = 12
    stretch: int = 40
    """Consecutive corrupt batches (data positions) of `corrupt_stretch`."""
    eval_batches: int = 8
    """Fixed held-out batches (of 16 rows) for the final eval loss."""
    eval_interval: int = 100
    """nanogpt: the loop's own evaluation (`estimate_loss`, 2 batches per split) and `ckpt.pt`."""
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in ("steps", "fault_step", "checkpoint_every", "batch", "block", "accum", "stretch", "surge_steps",
                     "eval_batches", "eval_interval"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.fault_step + max(self.surge_steps, self.stretch) >= self.steps:
            raise ValueError("LoopConfig: the faults must end inside the run (raise steps or lower fault_step)")

    def lr_at(self, it: int) -> float:
        """nanoGPT's `get_lr`: linear warmup, cosine decay to `min_lr` over the run."""
        if it < self.warmup:
            return self.lr * (it + 1) / (self.warmup + 1)
        ratio = min(1.0, (it - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)


#: `--quick`: every row at toy size (the guard's band is not even warm at the fault: meaningless numbers).
QUICK = LoopConfig(steps=30, fault_step=12, checkpoint_every=10, batch=4, block=16, stretch=4, surge_steps=3,
                   eval_batches=1, eval_interval=15)  # fmt: skip


@dataclass(kw_only=True)
class LoopRun:
    """One run: what it ended at and what the guard did."""

    loop: str
    fault: str
    guarded: bool
    eval_loss: float = math.nan
    vetoes: int = 0
    rollbacks: int = 0
    rollback_spans: list[int] = field(default_factory=list)
    """Per rollback: steps from the checkpoint returned to up to the step it was decided at."""
    outcome: str = "finished"
    seconds: float = 0.0
    actions: list[dict[str, Any]] = field(default_factory=list)


def token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss over the real targets, by a padding mask: a batch of padding only is 0/0, NaN in the
    loss and in every gradient (a clamped count would hide it; many loops do not clamp)."""
    keep = (targets != _PAD).flatten().float()  # (B*T,)
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")  # (B*T,)
    return (nll * keep).sum() / keep.sum()


class NanoGPT(GPT):
    """`hooks/nanogpt_loop.py`'s GPT (`(logits, loss)`, the causal mask built in each forward), with `token_mean`."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits, _ = super().forward(idx)  # (B, T, vocab)
        return logits, None if targets is None else token_mean(logits, targets)


class MaskedGPT(GPT):
    """nanoGPT's interface with the causal mask a `-inf` buffer, as `nn.Transformer` builds it, and `token_mean`."""

    def __init__(self, *, block_size: int, n_layer: int, n_embd: int) -> None:
        super().__init__(block_size=block_size, n_layer=n_layer, n_embd=n_embd)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(block_size))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x, self.causal[:T, :T])
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return logits, None if targets is None else token_mean(logits, targets)


# ------------------------------------------------------------------------------------------ data


def _rows(data: np.ndarray, ix: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix.tolist()])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix.tolist()])
    return x, y


def _planted(position: int, x: torch.Tensor, y: torch.Tensor, corrupt: range, nan: range) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch at `position` as a faulty data source serves it."""
    if position in corrupt:  # random bytes, the same on every pass
        gen = torch.Generator().manual_seed(1_000_003 + position)
        r = torch.randint(0, 256, (x.shape[0], x.shape[1] + 1), generator=gen)
        return r[:, :-1], r[:, 1:]
    if position in nan:  # a batch of padding only: no target, a token mean of 0/0
        return x, torch.full_like(y, _PAD)
    return x, y


class GetBatch:
    """nanoGPT's `get_batch(split)` (random offsets from the global RNG), serving a fault at data positions.

    `drawn` counts the training draws (gradients enabled): the data position of the next one.
    """

    def __init__(self, cfg: LoopConfig, train: np.ndarray, val: np.ndarray, corrupt: range, nan: range) -> None:
        self.cfg, self.train, self.val, self.corrupt, self.nan = cfg, train, val, corrupt, nan
        self.drawn = 0

    def __call__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - self.cfg.block - 1, (self.cfg.batch,))
        x, y = _rows(data, ix, self.cfg.block)
        if split == "train" and torch.is_grad_enabled():
            x, y = _planted(self.drawn, x, y, self.corrupt, self.nan)
            self.drawn += 1
        return x, y


class PositionBatches:
    """A re-iterable stream: batch i is random rows drawn with a generator seeded by i (the same on every pass)."""

    def __init__(self, cfg: LoopConfig, train: np.ndarray, n: int, corrupt: range, nan: range) -> None:
        self.cfg, self.train, self.n, self.corrupt, self.nan = cfg, train, n, corrupt, nan

    def __iter__(self):
        for i in range(self.n):
            gen = torch.Generator().manual_seed(7919 * (self.cfg.seed + 1) + i)
            ix = torch.randint(len(self.train) - self.cfg.block - 1, (self.cfg.batch,), generator=gen)
            yield _planted(i, *_rows(self.train, ix, self.cfg.block), self.corrupt, self.nan)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: LoopConfig, val: np.ndarray) -> float:
    """Mean loss on `eval_batches` fixed held-out batches of 16 rows (their own generator: no global RNG)."""
    gen = torch.Generator().manual_seed(0)
    was = model.training
    model.eval()
    losses = [float(model(*_rows(val, torch.randint(len(val) - cfg.block - 1, (16,), generator=gen), cfg.block))[1])
              for _ in range(cfg.eval_batches)]  # fmt: skip
    model.train(was)
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------ faults


class _StateFault:
    """Adam's `exp_avg_sq` zeroed before `step` (once, or every time the step is reached)."""

    def __init__(self, fault: str, step: int) -> None:
        self.active = fault in ("optimizer_state", "optimizer_state_returning")
        self.returning, self.step, self.done = fault == "optimizer_state_returning", step, False

    def __call__(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.active and step == self.step and (self.returning or not self.done):
            self.done = True
            for state in optimizer.state.values():
                state["exp_avg_sq"].zero_()


def _ranges(cfg: LoopConfig, fault: str, per_step: int) -> tuple[range, range, range]:
    """Surge steps, corrupt positions and NaN positions of `fault` (`per_step` batches per step)."""
    first = cfg.fault_step * per_step
    surge = range(cfg.fault_step, cfg.fault_step + cfg.surge_steps) if fault == "lr_surge" else range(0)
    corrupt = range(first, first + cfg.stretch) if fault == "corrupt_stretch" else range(0)
    nan = range(first, first + 1) if fault == "nan_batch" else range(0)
    return surge, corrupt, nan


# ------------------------------------------------------------------------------------------ loops


def _nanogpt(cfg: LoopConfig, fault: str, run: LoopRun, run_dir: Path) -> nn.Module:
    """nanoGPT's `train.py` loop, shrunk; the guarded run differs in the lines marked `# spikedoc`."""
    train_data, val_data = token_arrays()
    surge, corrupt, nan = _ranges(cfg, fault, cfg.accum)
    plant = _StateFault(fault, cfg.fault_step)
    source = GetBatch(cfg, train_data, val_data, corrupt, nan)
    get_batch = source
    torch.manual_seed(cfg.seed)
    model = NanoGPT(block_size=cfg.block, n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    guard = None
    if run.guarded:
        guard = spikedoc.Guard(model, optimizer, data=get_batch, scaler=scaler, run_dir=run_dir, clip=None,
                               checkpoint_every=cfg.checkpoint_every)  # spikedoc
        get_batch = guard.draw  # spikedoc
        run.actions = guard.actions  # the same list: it fills as the guard acts, a stop included

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {split: float(torch.stack([model(*get_batch(split))[1] for _ in range(2)]).mean()) for split in ("train", "val")}
        model.train()
        return out

    drawn_at: dict[int, int] = {}  # the data position at each iteration's start (its latest pass)
    best_val_loss = 1e9
    X, Y = get_batch("train")
    steps = guard.steps() if guard is not None else iter(range(cfg.steps))  # spikedoc
    for iter_num in steps:
        if drawn_at and iter_num <= max(drawn_at):  # a rollback: back to where that step began
            source.drawn = drawn_at[iter_num]
            drawn_at = {it: at for it, at in drawn_at.items() if it <= iter_num}
        drawn_at[iter_num] = source.drawn
        plant(iter_num, optimizer)
        lr = cfg.lr_at(iter_num) * (cfg.surge_factor if iter_num in surge else 1.0)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % cfg.eval_interval == 0:
            losses = estimate_loss()
            if losses["val"] < best_val_loss and iter_num > 0:
                best_val_loss = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num},
                           os.path.join(run_dir, "ckpt.pt"))  # fmt: skip
        for _ in range(cfg.accum):
            _, loss = model(X, Y)
            loss = loss / cfg.accum
            X, Y = get_batch("train")  # prefetch the next batch
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num + 1 >= cfg.steps:
            break
    if guard is not None:
        guard.close()
    return model


def _masked(cfg: LoopConfig, fault: str, run: LoopRun, run_dir: Path) -> nn.Module:
    """The guard's own iteration, a LambdaLR given as `scheduler=`, a model with a `-inf` mask buffer."""
    train_data, _ = token_arrays()
    surge, corrupt, nan = _ranges(cfg, fault, 1)
    plant = _StateFault(fault, cfg.fault_step)
    torch.manual_seed(cfg.seed)
    model = MaskedGPT(block_size=cfg.block, n_layer=cfg.n_layer, n_embd=cfg.n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def factor(step: int) -> float:  # nanoGPT's get_lr as a LambdaLR factor, surged where the fault says
        return cfg.lr_at(step) / cfg.lr * (cfg.surge_factor if step in surge else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    data = PositionBatches(cfg, train_data, 2 * cfg.steps, corrupt, nan)  # twice the run: skips leave enough
    guard = None
    if run.guarded:
        guard = spikedoc.Guard(model, optimizer, scheduler=scheduler, data=data, run_dir=run_dir,
                               checkpoint_every=cfg.checkpoint_every, max_steps=cfg.steps)  # fmt: skip
        run.actions = guard.actions  # the same list: it fills as the guard acts, a stop included
        batches: Any = guard
    else:
        batches = zip(range(cfg.steps), data)
    for step, (x, y) in batches:
        plant(step, optimizer)
        _, loss = model(x, y)
        loss.backward()
        if guard is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if guard is not None:
        guard.close()
    return model


_LOOP_FNS: dict[str, Callable[[LoopConfig, str, LoopRun, Path], nn.Module]] = {"nanogpt": _nanogpt, "masked": _masked}


def train_loop(cfg: LoopConfig, loop: str, fault: str, *, guarded: bool, work_dir: Path) -> LoopRun:
    """Train one run of `loop` with `fault` (unguarded or under the guard) and evaluate it."""
    if loop not in _LOOP_FNS or fault not in LOOP_FAULTS:
        raise ValueError(f"unknown loop {loop!r} or fault {fault!r}: loops {LOOPS}, faults {LOOP_FAULTS}")
    run = LoopRun(loop=loop, fault=fault, guarded=guarded)
    run_dir = work_dir / f"{loop}-{fault}-{'guard' if guarded else 'none'}"
    run_dir.mkdir(parents=True, exist_ok=True)
    _, val = token_arrays()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _LOOP_FNS[loop](cfg, fault, run, run_dir)
        run.eval_loss = evaluate(model, cfg, val)
    except spikedoc.GuardStopped as stop:
        run.outcome = f"GuardStopped at step {stop.diagnosis['step']} ({stop.diagnosis['reason']})"
    finally:
        torch.set_num_threads(threads)
    rollbacks = [a for a in run.actions if a["kind"] == "rollback"]
    run.vetoes = sum(a["kind"] == "veto" for a in run.actions)
    run.rollbacks = len(rollbacks)
    run.rollback_spans = [a["from_step"] - a["to_step"] for a in rollbacks]
    run.seconds = time.perf_counter() - start
    return run


def run_loops(cfg: LoopConfig, work_dir: Path, progress: Callable[[str], None] | None = None) -> dict[tuple[str, str, bool], LoopRun]:
    """Every loop x fault, unguarded and guarded."""
    results = {}
    for loop in LOOPS:
        for fault in LOOP_FAULTS:
            for guarded in (False, True):
                r = train_loop(cfg, loop, fault, guarded=guarded, work_dir=work_dir)
                results[loop, fault, guarded] = r
                if progress:
                    progress(f"{loop:>8} {fault:>26} {'guard' if guarded else 'none':>5}: eval {r.eval_loss:.4f}, "
                             f"vetoes {r.vetoes}, rollbacks {r.rollbacks} {r.rollback_spans}, {r.outcome}, {r.seconds:.0f} s")  # fmt: skip
    return results
