"""One run of the exam: the demo's tiny byte-level GPT trained under `spikedoc.watch`, one fault planted.

A run is a `Setup` (the variant axes: seed, size, batch, optimizer, schedule, clipping, the model's
output, accumulation, checkpoints) and a `Fault` (or None: the clean twin). Faulty run and twin read
the same batches and start from the same weights, so before the fault they are the same run, step
for step; after it, every difference is the fault's.
"""

from __future__ import annotations

import base64
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import spikedoc
from bench.guard_recovery import Batches, eval_set, evaluate, split_corpus
from spikedoc.demo.training import PAD, Recipe, _deterministic, _TinyGPT

__all__ = ["Setup", "Fault", "FAMILIES", "KINDS", "train"]

#: Fault families and their kinds (what each does: `Fault.kind`).
KINDS = {
    "bad_batch": ("random", "constant", "long", "repeated", "noise"),
    "lr_surge": ("surge",),
    "lr_restart": ("restart", "rescaled"),
    "optimizer_state": ("zero_v", "scale_v", "scale_m", "drop"),
    "state_reset": ("resume_fresh", "reinit"),
    "nonfinite": ("loss_nan", "loss_inf", "grad_nan", "weight_inf"),
    "instability": ("no_warmup",),
}
FAMILIES = tuple(KINDS)

#: Peak LR of each optimizer at the `lr_scale` 1 (the tiny GPT trains well and stably there).
BASE_LR = {"adamw": 6e-3, "adam": 6e-3, "sgd": 0.3, "lion": 1.5e-3}
CHECKPOINT_EVERY = 40
#: Held-out evaluation: batches x sequences of 64 bytes from the last 10% of the corpus.
EVAL_BATCHES, EVAL_BATCH = 4, 32


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The variant axes of one run (its clean twin has the same)."""

    seed: int
    """Initialisation and data stream; even seeds are the exam's calibration half, odd its test half."""
    steps: int = 120
    d_model: int = 32
    n_layer: int = 2
    batch: int = 16
    """Sequences per optimizer step (over all micro-batches)."""
    accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: str = "adamw"
    """`adamw`, `adam`, `sgd` (momentum 0.9) or `lion`."""
    lr_scale: float = 1.0
    """Peak LR as a multiple of the optimizer's `BASE_LR`."""
    warmup: int = 12
    """Linear warmup steps (1: none), then cosine decay to a tenth."""
    beta2: float = 0.95
    clip: float | None = None
    """`clip_grad_norm_` max norm in the loop; None: no clipping."""
    output: str = "loss"
    """The model returns its `loss` (captured by the monitor) or `logits` (the loop records the loss)."""
    checkpoints: str = "none"
    """`none`, `numbered` (one file per checkpoint) or `overwrite` (one `ckpt.pt`, as nanoGPT)."""

    def __post_init__(self) -> None:
        if self.optimizer not in BASE_LR:
            raise ValueError(f"Setup.optimizer must be one of {sorted(BASE_LR)}, got {self.optimizer!r}")
        if self.output not in ("loss", "logits") or self.checkpoints not in ("none", "numbered", "overwrite"):
            raise ValueError("Setup.output must be loss|logits and Setup.checkpoints none|numbered|overwrite")
        if self.batch % self.accum:
            raise ValueError(f"Setup.accum ({self.accum}) must divide Setup.batch ({self.batch})")

    @property
    def peak_lr(self) -> float:
        return BASE_LR[self.optimizer] * self.lr_scale


@dataclass(frozen=True, kw_only=True)
class Fault:
    """What goes wrong, and when."""

    family: str
    kind: str
    step: int
    """First step the fault acts on (0 for the instabilities, which are the recipe itself)."""
    length: int = 1
    """Steps it lasts (bad batches, LR surges)."""
    factor: float = 1.0
    """LR surge multiplier; the instabilities' LR multiplier; a rescaled resume's LR multiplier."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS.get(self.family, ()):
            raise ValueError(f"Fault: unknown family/kind {self.family}/{self.kind}")


def as_dict(setup: Setup, fault: Fault | None) -> dict[str, Any]:
    """The JSON form of a run's spec (its cache key)."""
    return {"setup": asdict(setup), "fault": None if fault is None else asdict(fault)}


def effective(setup: Setup, fault: Fault | None) -> Setup:
    """The setup a run trains with: an instability is a recipe (no warmup, the LR `factor` x higher), not an event."""
    if fault is None or fault.family != "instability":
        return setup
    return replace(setup, warmup=1, lr_scale=setup.lr_scale * fault.factor)


def _recipe(setup: Setup) -> Recipe:
    return Recipe(steps=setup.steps, batch=setup.batch // setup.accum, min_len=8, max_len=32, context=128,
                  d_model=setup.d_model, n_head=2, n_layer=setup.n_layer, lr=setup.peak_lr, warmup=setup.warmup,
                  checkpoint_every=CHECKPOINT_EVERY)  # fmt: skip


def _optimizer(setup: Setup, params: Any) -> torch.optim.Optimizer:
    lr, wd = setup.peak_lr, 0.1
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, setup.beta2), weight_decay=wd)
    if setup.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, setup.beta2))
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    from lion_pytorch import Lion

    return Lion(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd)


class _LossModel(nn.Module):
    """Returns the token-mean loss: the monitor captures it from the output."""

    def __init__(self, gpt: _TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        nll = self.gpt(input_ids=input_ids, attention_mask=attention_mask)  # (B, T-1), zero on padding
        return nll.sum() / attention_mask[:, 1:].sum().clamp(min=1)


class _LogitsModel(nn.Module):
    """Returns logits: the loop computes the loss and hands it to `monitor.record`."""

    def __init__(self, gpt: _TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.logits(input_ids)  # (B, T, V)


def _logits_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask[:, 1:].flatten().bool()  # (B*(T-1),): a next token exists
    return F.cross_entropy(logits[:, :-1].flatten(0, 1)[keep], ids[:, 1:].flatten()[keep])


# ------------------------------------------------------------------------------------ faults


def _bad_batch(kind: str, ids: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch a bad-batch fault puts in place of (ids, mask)."""
    real = mask.bool()
    if kind == "random":  # a corrupt shard: uniformly random bytes at the batch's own lengths
        return torch.where(real, torch.randint(0, 256, ids.shape, generator=gen), PAD), mask
    if kind == "constant":  # a zero-filled region
        return torch.where(real, 0, PAD), mask
    if kind == "noise":  # 30% of the bytes replaced: noisy labels (and inputs) in an otherwise real batch
        flip = (torch.rand(ids.shape, generator=gen) < 0.3) & real
        return torch.where(flip, torch.randint(0, 256, ids.shape, generator=gen), ids), mask
    # long: base64 of random bytes (an inlined binary), the model's full context, 4x the longest real row
    raw = torch.randint(0, 256, (len(ids) * 128,), generator=gen)
    blob = base64.b64encode(raw.to(torch.uint8).numpy().tobytes())[: len(ids) * 128]
    long = torch.tensor(list(blob), dtype=torch.long).view(len(ids), 128)
    return long, torch.ones_like(long)


def _corrupt_state(kind: str, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer-state corruption between two steps (a lossy converter, a bad resume of the moments)."""
    if kind == "drop":  # the state never loaded: moments and step counts start again
        optimizer.state.clear()
        return
    for state in optimizer.state.values():
        for key, value in state.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if kind == "zero_v" and key == "exp_avg_sq":
                value.zero_()
            elif kind == "scale_v" and key == "exp_avg_sq":
                value.mul_(1e-4)
            elif kind == "scale_m" and key in ("exp_avg", "momentum_buffer"):
                value.mul_(100.0)


def _first_matrix(model: nn.Module) -> torch.Tensor:
    return next(p for name, p in model.named_parameters() if p.dim() == 2 and "blocks" in name)


# ------------------------------------------------------------------------------------ training


class _Loop:
    """The state of one training run: model, optimizer, monitor, data, and what was planted."""

    def __init__(self, setup: Setup, fault: Fault | None, run_dir: Path, ckpt_dir: Path) -> None:
        self.setup, self.fault, self.run_dir, self.ckpt_dir = effective(setup, fault), fault, run_dir, ckpt_dir
        self.recipe = _recipe(self.setup)
        train_data, held_out = split_corpus()
        per_pass = math.ceil(self.setup.steps * self.setup.accum / 2)  # Batches yields twice its recipe's steps
        self.batches = list(Batches(replace(self.recipe, steps=per_pass), train_data, self.setup.seed))
        self.evals = eval_set(held_out, EVAL_BATCHES, EVAL_BATCH)
        self.gen = torch.Generator().manual_seed(7919 * (self.setup.seed + 1))
        self.schedule_origin = 0
        self.losses: list[float] = []
        self.checkpoints: list[list[Any]] = []
        self.model, self.optimizer = self._fresh(self.setup.seed)
        self.monitor = self._watch(start_step=None)

    def _fresh(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        gpt = _TinyGPT(self.recipe)
        model = _LossModel(gpt) if self.setup.output == "loss" else _LogitsModel(gpt)
        return model, _optimizer(self.setup, model.parameters())

    def _watch(self, start_step: int | None) -> Any:
        # A reference recording: every statistic on every step, so that a run is the same on every machine.
        return spikedoc.watch(self.model, self.optimizer, run_dir=self.run_dir, layer_every=1, budget=None,
                              start_step=start_step, pad_token_id=PAD)  # fmt: skip

    def _acts(self, step: int, family: str) -> bool:
        f = self.fault
        return f is not None and f.family == family and f.step <= step < f.step + f.length

    def run(self) -> None:
        for step in range(self.setup.steps):
            self._between_steps(step)
            self.losses.append(self._step(step))
            if (step + 1) % CHECKPOINT_EVERY == 0 and self.setup.checkpoints != "none":
                self._checkpoint(step + 1)
        self.monitor.close()

    def _checkpoint(self, step: int) -> None:
        name = f"step-{step:06d}.pt" if self.setup.checkpoints == "numbered" else "ckpt.pt"
        path = self.ckpt_dir / name
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}, path)
        self.monitor.event("checkpoint", path=str(path))  # at `step`: the state before step `step`
        self.checkpoints.append([step, str(path)])

    def _between_steps(self, step: int) -> None:
        """Faults that act on the state before `step`'s forward."""
        f = self.fault
        if f is None or f.step != step or f.family in ("bad_batch", "lr_surge", "instability"):
            return
        if f.family == "lr_restart" or (f.family == "state_reset" and f.kind == "resume_fresh"):
            # A restart: the run stops and resumes as a new segment of the same run directory (a
            # rescaled resume restores everything; its LR is scaled from here on: `_lr_factor`).
            self.monitor.close()
            if f.kind == "restart":  # state restored, but the scheduler starts again from 0
                self.schedule_origin = step
            elif f.family == "state_reset":  # step count, schedule and data position restored; model and optimizer never loaded
                self.model, self.optimizer = self._fresh(self.setup.seed + 1000)
            self.monitor = self._watch(start_step=step)
        elif f.family == "state_reset":  # weights re-initialised in place (a stray init call)
            fresh, _ = self._fresh(self.setup.seed + 1000)
            with torch.no_grad():
                for p, q in zip(self.model.parameters(), fresh.parameters()):
                    p.copy_(q)
        elif f.family == "optimizer_state":
            _corrupt_state(f.kind, self.optimizer)
        elif f.kind == "weight_inf":
            with torch.no_grad():
                _first_matrix(self.model)[3, 5] = math.inf

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k = self.setup.accum
        if self._acts(step, "bad_batch") and self.fault.kind == "repeated":
            step = self.fault.step  # a loader stuck on one batch
        out = [(b["ids"], b["mask"]) for b in self.batches[step * k : step * k + k]]
        if self._acts(step, "bad_batch") and self.fault.kind != "repeated":
            out = [_bad_batch(self.fault.kind, ids, mask, self.gen) for ids, mask in out]
        return out

    def _lr_factor(self, step: int) -> float:
        """The LR's multiplier at `step`: an LR surge while it lasts; a rescaled resume from the resume on."""
        f = self.fault
        rescaled = f is not None and f.kind == "rescaled" and step >= f.step
        return f.factor if self._acts(step, "lr_surge") or rescaled else 1.0

    def _step(self, step: int) -> float:
        lr = self.recipe.lr_at(step - self.schedule_origin) * self._lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        poison = self.fault is not None and self.fault.family == "nonfinite" and self.fault.step == step
        total = 0.0
        for i, (ids, mask) in enumerate(self._micro_batches(step)):
            if self.setup.output == "loss":
                loss = self.model(input_ids=ids, attention_mask=mask)
            else:
                loss = _logits_loss(self.model(input_ids=ids), ids, mask)
            if poison and i == 0 and self.fault.kind in ("loss_nan", "loss_inf"):
                loss = loss * (math.nan if self.fault.kind == "loss_nan" else math.inf)
            if self.setup.output == "logits":
                self.monitor.record(loss=loss.detach())
            (loss / self.setup.accum).backward()
            total += float(loss.detach()) / self.setup.accum
        if poison and self.fault.kind == "grad_nan":
            with torch.no_grad():
                _first_matrix(self.model).grad[2, 1] = math.nan
        if self.setup.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.setup.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def train(setup: Setup, fault: Fault | None, run_dir: str | Path, ckpt_dir: str | Path) -> dict[str, Any]:
    """Train one run into `run_dir` (replaced if present), checkpoints into `ckpt_dir`; return its record.

    Returns:
        `loss` (per step, as the loop saw it), `eval_loss` (held-out, after the last step; NaN when the
        weights are non-finite), `checkpoints` ([step, path] in the order written), `seconds` (CPU seconds).

    Example:
        >>> train(Setup(seed=1, steps=5), None, "/tmp/exam-run", "/tmp/exam-ckpt")["loss"][:1]  # doctest: +SKIP
        [5.6...]
    """
    run_dir, ckpt_dir = Path(run_dir), Path(ckpt_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True)
    start = time.process_time()  # CPU time of this process (its writer threads included), not the shared machine's clock
    with _deterministic(setup.seed):
        loop = _Loop(setup, fault, run_dir, ckpt_dir)
        try:
            loop.run()
        finally:
            loop.monitor.close()
        eval_loss = evaluate(loop.model.gpt, loop.evals)
    return {"loss": loop.losses, "eval_loss": eval_loss, "checkpoints": loop.checkpoints,
            "seconds": time.process_time() - start}  # fmt: skip
