"""Measure spikedoc's per-step monitoring overhead against the loggers people use today.

Trains the same small GPT-style character model on CPU, from the same initial weights and the same
batch order, once per variant and round: no monitoring, `spikedoc.watch`, a hand-written per-parameter
`.item()` logger, TensorBoard per-layer scalars and `wandb.watch(log="all")` offline. Variants
alternate round-robin (rotated each round) so that the machine's drift hits all of them alike; the
overhead of a variant is the median over rounds of its median step time divided by the baseline's in
the same round.

    python bench/overhead.py [--rounds N] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# `python bench/overhead.py` from a checkout: make `spikedoc` and `bench._report` importable without
# installing the package.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench._loggers import BASELINE, LOGGERS, Logger
from bench._report import machine_line, write_section

__all__ = [
    "VARIANTS",
    "BenchConfig",
    "BenchResult",
    "VariantResult",
    "format_report",
    "main",
    "run_benchmark",
]

#: Variant names in table order; the first is the reference every ratio is taken against.
VARIANTS = (BASELINE, "spikedoc", "hand_item_logger", "tensorboard", "wandb")


@dataclass(kw_only=True)
class BenchConfig:
    """Model, data and measurement settings; the defaults give a 20-100 ms step on a 2-core CPU."""

    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide `d_model`."""
    d_model: int = 128
    """Residual stream width."""
    seq_len: int = 128
    """Characters per sample."""
    batch_size: int = 16
    """Samples per optimizer step."""
    lr: float = 3e-4
    """AdamW learning rate (nanoGPT's character-level default is 1e-3; lower keeps 50+ steps calm)."""
    rounds: int = 10
    """Round-robin rounds; each trains every variant once. More rounds narrow the IQR."""
    steps: int = 50
    """Timed optimizer steps per variant and round."""
    warmup: int = 5
    """Untimed steps first in every run (allocator, autograd graph caches, monitor's first step)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """`torch.set_num_threads`; all cores by default, as a CPU training run would use them."""
    seed: int = 0
    """Seeds the initial weights and the batch order shared by all variants."""
    variants: tuple[str, ...] = VARIANTS
    """Which variants to run; must start with "baseline"."""

    def __post_init__(self) -> None:
        for name in (
            "n_layer",
            "n_head",
            "d_model",
            "seq_len",
            "batch_size",
            "rounds",
            "steps",
            "threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup must be >= 0, got {self.warmup}")
        if self.d_model % self.n_head:
            raise ValueError(f"BenchConfig.n_head={self.n_head} must divide d_model={self.d_model}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"BenchConfig.variants has unknown {sorted(unknown)}; choose from {VARIANTS}")
        if not self.variants or self.variants[0] != BASELINE:
            raise ValueError(f"BenchConfig.variants must start with {BASELINE!r}, got {self.variants}")

    def describe(self, n_params: int, vocab: int) -> str:
        return (
            f"GPT-style char LM on the text of Python's docs (`pydoc_data.topics`, vocab {vocab}): "
            f"{self.n_layer} layers, d_model {self.d_model}, {self.n_head} heads, seq {self.seq_len}, "
            f"batch {self.batch_size}, {n_params / 1e6:.2f}M parameters, fp32, AdamW lr {self.lr:g} "
            f"wd 0.1, {self.threads} torch threads; {self.rounds} rounds x {self.steps} timed steps "
            f"(+{self.warmup} warmup) per variant."
        )


@dataclass(kw_only=True)
class VariantResult:
    """What one variant measured: step times per round, setup/teardown cost, and its final losses."""

    name: str
    step_times: list[list[float]] = field(default_factory=list)  # seconds, [round][timed step]
    open_close: list[float] = field(default_factory=list)  # seconds per round, outside step times
    final_losses: list[float] = field(default_factory=list)  # last step's loss per round
    run_dirs: list[Path] = field(default_factory=list)
    unavailable: str | None = None  # why the variant could not run, if it could not


@dataclass(kw_only=True)
class BenchResult:
    config: BenchConfig
    results: dict[str, VariantResult]
    n_params: int
    n_tensors: int  # parameter tensors, i.e. rows per step in a per-layer log
    vocab: int


# --- the model and data: nanoGPT's shape, small enough for a CPU ---------------------------------


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


class _GPT(nn.Module):
    """Returns the scalar loss, so spikedoc captures it without a `record` call."""

    def __init__(self, cfg: BenchConfig, vocab: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _corpus() -> tuple[torch.Tensor, int]:
    # Real English prose and code samples that ship with CPython: no download.
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


def _batches(data: torch.Tensor, cfg: BenchConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(
        len(data) - cfg.seq_len - 1,
        (cfg.warmup + cfg.steps, cfg.batch_size),
        generator=gen,
    )
    out = []
    for row in starts:
        window = torch.stack([data[s : s + cfg.seq_len + 1] for s in row.tolist()])  # (B, T+1)
        out.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return out


# --- measurement ------------------------------------------------------------------------------------


def _train(cfg, vocab, init_state, batches, variant: Logger, run_dir: Path) -> tuple[list[float], float, float]:
    """One run: fresh model from `init_state`, every batch once; returns (timed steps, open+close s, last loss)."""
    model = _GPT(cfg, vocab)
    model.load_state_dict(init_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    gc.collect()  # the previous run's garbage is not this run's cost
    start = time.perf_counter()
    variant.open(model, optimizer, run_dir)
    open_close = time.perf_counter() - start
    times = []
    try:
        for x, y in batches:
            t0 = time.perf_counter()
            loss = model(x, y)
            loss.backward()
            variant.before_step()
            optimizer.step()
            variant.after_step(loss)
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    finally:
        start = time.perf_counter()
        variant.close()
        open_close += time.perf_counter() - start
    return times[cfg.warmup :], open_close, loss.item()


def run_benchmark(cfg: BenchConfig, *, work_dir: Path | None = None, progress=None) -> BenchResult:
    """Train every variant `cfg.rounds` times, alternating, and collect per-step times.

    Args:
        cfg: model, data and measurement settings.
        work_dir: where each run writes its logs (`round<r>/<variant>/`); a temporary directory that
            is deleted afterwards when None.
        progress: optional callable taking one line of text after each run.

    Example:
        >>> result = run_benchmark(BenchConfig(n_layer=1, d_model=32, seq_len=16, rounds=1, steps=2))
        >>> len(result.results["baseline"].step_times[0])
        2
    """
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="spikedoc-overhead-") as tmp:
            return run_benchmark(cfg, work_dir=Path(tmp), progress=progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data, vocab = _corpus()
        batches = _batches(data, cfg)
        torch.manual_seed(cfg.seed)
        model = _GPT(cfg, vocab)
        init_state = {k: v.clone() for k, v in model.state_dict().items()}
        n_params = sum(p.numel() for p in model.parameters())
        n_tensors = len(list(model.parameters()))
        results = {name: VariantResult(name=name) for name in cfg.variants}
        for r in range(cfg.rounds):
            shift = r % len(cfg.variants)  # rotate so no variant always runs right after another
            for name in cfg.variants[shift:] + cfg.variants[:shift]:
                res = results[name]
                if res.unavailable:
                    continue
                run_dir = work_dir / f"round{r}" / name
                try:
                    times, open_close, last = _train(cfg, vocab, init_state, batches, LOGGERS[name](), run_dir)
                except Exception as exc:  # a peer that cannot run here is reported, not fatal
                    if name in (BASELINE, "spikedoc"):
                        raise
                    res.unavailable = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    continue
                res.step_times.append(times)
                res.open_close.append(open_close)
                res.final_losses.append(last)
                res.run_dirs.append(run_dir)
                if progress:
                    progress(
                        f"round {r + 1}/{cfg.rounds} {name:>16}: median {1e3 * statistics.median(times):.1f} ms/step"
                    )
        return BenchResult(
            config=cfg,
            results=results,
            n_params=n_params,
            n_tensors=n_tensors,
            vocab=vocab,
        )
    finally:
        torch.set_num_threads(threads)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    return ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)


def _ratios(result: BenchResult, name: str) -> list[float]:
    """Per-round ratio of this variant's median step time to the baseline's in the same round."""
    base = result.results[BASELINE].step_times
    return [statistics.median(t) / statistics.median(b) for t, b in zip(result.results[name].step_times, base)]


def format_report(result: BenchResult, command: str) -> str:
    """The BENCHMARKS.md section: what was run, on what, the table, and whether the target is met."""
    cfg = result.config
    base_loss = result.results[BASELINE].final_losses
    lines = [
        "## Monitoring overhead (`bench/overhead.py`)",
        "",
        (
            "Same model, same initial weights, same batch order for every variant; variants alternate "
            "round-robin (order rotated each round) in one process. Step time = forward + backward + "
            "`optimizer.step()` + the variant's own work + `zero_grad`, timed per step, warmup excluded. "
            "Overhead = median over rounds of (variant's median step time / baseline's median step time in "
            "the same round) - 1, with the interquartile range and min/max of that ratio over rounds. "
            "Opening and closing the logger (including spikedoc's and TensorBoard's final flush and wandb's "
            "run start/finish) is outside the step time and shown separately."
        ),
        "",
        f"- Model: {cfg.describe(result.n_params, result.vocab)}",
        f"- {machine_line()}",
        f"- Command: `{command}`",
        "",
        "| variant | median step ms | overhead % median [IQR] | min / max % | open+close s | same losses as baseline | records |",
        "| --- | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    overheads = {}
    for name in cfg.variants:
        res = result.results[name]
        records = LOGGERS[name].records
        if res.unavailable or not res.step_times:
            lines.append(f"| {name} | not run | - | - | - | - | could not run here: {res.unavailable} |")
            continue
        all_times = [t for run in res.step_times for t in run]
        ratios = [x - 1 for x in _ratios(result, name)]
        overheads[name] = statistics.median(ratios)
        same = all(a == b for a, b in zip(res.final_losses, base_loss))
        overhead = (
            "-"
            if name == BASELINE
            else (
                f"{100 * overheads[name]:+.1f} [{100 * _quantile(ratios, 0.25):+.1f}, {100 * _quantile(ratios, 0.75):+.1f}]"
            )
        )
        spread = "-" if name == BASELINE else f"{100 * min(ratios):+.1f} / {100 * max(ratios):+.1f}"
        lines.append(
            f"| {name} | {1e3 * statistics.median(all_times):.1f} | {overhead} | {spread} | "
            f"{statistics.median(res.open_close):.2f} | {'yes' if same else 'NO'} | {records} |"
        )
    if "spikedoc" in overheads:
        peers = {k: v for k, v in overheads.items() if k not in (BASELINE, "spikedoc")}
        ours = overheads["spikedoc"]
        met = ours <= 0.03 and all(ours < v for v in peers.values())
        lines += [
            "",
            (
                f"Target (issue #2): spikedoc <= 3% and below every peer. Measured {100 * ours:+.1f}%, "
                f"cheapest peer {min(peers.values(), default=math.nan) * 100:+.1f}%: **{'met' if met else 'not met'}**."
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="round-robin rounds (default 10; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 50; 5 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few steps, prints, does not write BENCHMARKS.md",
    )
    args = parser.parse_args(argv)
    options = {
        "rounds": args.rounds or (2 if args.quick else 10),
        "steps": args.steps or (5 if args.quick else 50),
    }
    if args.quick:
        options["warmup"] = 1
    if args.threads:
        options["threads"] = args.threads
    cfg = BenchConfig(**options)
    result = run_benchmark(cfg, progress=lambda line: print(line, flush=True))
    command = shlex.join(["python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    report = format_report(result, command)
    print(report)
    if not args.quick:
        write_section("overhead", report)


if __name__ == "__main__":
    main()
