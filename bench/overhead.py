"""Measure spikedoc's monitoring overhead end to end, against the loggers people use today.

Trains the same small GPT-style character model on CPU, from the same initial weights and the same
batch order, once per variant and round: no monitoring (twice), `spikedoc.watch`, a hand-written
per-parameter `.item()` logger, TensorBoard per-layer scalars and `wandb.watch(log="all")` offline.
Each variant trains its whole run continuously and is timed as its user waits: the logger's setup,
every step back to back (background work overlapping later steps as in a real run, never drained
untimed) and its `close()`. Within a round the variants run one after another in a random order, so
the load of other processes hits all of them alike. The overhead of a variant is the median over
rounds of its end-to-end time divided by the baseline's in the same round.

    python bench/overhead.py [--model small|large] [--threads N] [--rounds N] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# `python bench/overhead.py` from a checkout: make `spikedoc` and `bench._report` importable without
# installing the package.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench._char_gpt import CharGPT, batches, corpus
from bench._loggers import BASELINE, LOGGERS
from bench._overhead_report import format_report
from bench._report import write_section

__all__ = ["MODELS", "VARIANTS", "BenchConfig", "BenchResult", "VariantResult", "format_report", "main", "run_benchmark"]

#: Variant names in table order; the first is the reference every ratio is taken against.
VARIANTS = (
    BASELINE, "baseline_repeat", "spikedoc", "spikedoc_full", "hand_item_logger", "tensorboard",
    "wandb",
)  # fmt: skip


#: Model presets of the command line, as `BenchConfig` fields.
MODELS: dict[str, dict[str, int]] = {
    "small": {},
    "large": {"d_model": 192, "n_layer": 4, "n_head": 4, "batch_size": 16, "seq_len": 128},
}


@dataclass(kw_only=True)
class BenchConfig:
    """Model, data and measurement settings; the defaults give a ~100 ms step on one core of this CPU."""

    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide `d_model`."""
    d_model: int = 128
    """Residual stream width."""
    seq_len: int = 128
    """Characters per sample."""
    batch_size: int = 8
    """Samples per optimizer step (8 x 128 tokens keeps a one-thread step near 100 ms here)."""
    lr: float = 3e-4
    """AdamW learning rate (nanoGPT's character-level default is 1e-3; lower keeps 50+ steps calm)."""
    rounds: int = 5
    """Rounds; each trains every variant once, in alternating turns. More rounds narrow the IQR."""
    steps: int = 100
    """Optimizer steps per variant and round after the warmup; with the warmup more than spikedoc's
    default `flush_every` (100), so one Parquet flush of its writer falls inside the run."""
    warmup: int = 5
    """Steps first in every run left out of the per-step medians (allocator, autograd graph caches,
    monitor's first step); the end-to-end time includes them."""
    threads: int = 1
    """`torch.set_num_threads`. One: on a shared 2-core machine another process then slows a step by
    its share of a core, whereas with 2 threads every parallel region waits for the preempted thread
    and single steps took 3-10x longer (measured). Loggers' background threads then get the idle core
    for free, which is why the report also gives their CPU time per step."""
    seed: int = 0
    """Seeds the initial weights and the batch order shared by all variants."""
    lockstep: bool = False
    """Train the variants side by side, step i of each (in a random order) before step i + 1, instead
    of whole runs one after another: a burst of load from another process then falls on every
    variant alike instead of on one whole run, which with every core busy is most of the noise."""
    variants: tuple[str, ...] = VARIANTS
    """Which variants to run; must start with "baseline"."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "seq_len", "batch_size", "rounds", "steps", "threads"):
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
            f"(+{self.warmup} warmup) per variant, "
            + ("the variants side by side, step by step." if self.lockstep else "each run continuous.")
        )


@dataclass(kw_only=True)
class VariantResult:
    """What one variant measured: step times per round, setup/teardown cost, and its final losses."""

    name: str
    end_to_end: list[float] = field(default_factory=list)  # seconds per round: open, every step, close
    step_times: list[list[float]] = field(default_factory=list)  # seconds, [round][timed step]
    background_cpu: list[float] = field(default_factory=list)  # CPU s per step of its threads/processes
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


# --- measurement ------------------------------------------------------------------------------------


def _model(cfg: BenchConfig, vocab: int) -> CharGPT:
    return CharGPT(vocab=vocab, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, seq_len=cfg.seq_len)


def _background() -> dict[str, float]:
    """CPU seconds of every thread but the main one and of every child process, by `t<tid>`/`p<pid>`.

    A logger's background thread (spikedoc's Parquet writer, TensorBoard's event writer) or process
    (wandb's service) runs on the core the one torch thread leaves idle: no step time, but paid for.
    Empty where /proc does not exist.
    """
    out: dict[str, float] = {}
    try:
        tick = os.sysconf("SC_CLK_TCK")
        main = threading.main_thread().native_id
        for task in Path("/proc/self/task").iterdir():
            if int(task.name) != main:
                out[f"t{task.name}"] = sum(int(f) for f in _stat(task / "stat")[11:13]) / tick  # utime, stime
            for pid in (task / "children").read_text().split():
                out[f"p{pid}"] = sum(int(f) for f in _stat(Path(f"/proc/{pid}/stat"))[11:15]) / tick  # + children
    except (OSError, ValueError, AttributeError):  # not Linux, or a task ended meanwhile
        pass
    return out


def _stat(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()  # fields after the command name, from field 3


class _Run:
    """One variant's run in a round: its own model and optimizer from `init_state`, and its logger."""

    def __init__(self, name: str, cfg: BenchConfig, vocab: int, init_state: dict, run_dir: Path) -> None:
        self.name, self.run_dir, self.logger = name, run_dir, LOGGERS[name]()
        self.model = _model(cfg, vocab)
        self.model.load_state_dict(init_state)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.1)
        self.times: list[float] = []
        self.open_close = 0.0
        self.owned: set[str] = set()  # background threads/processes that appeared in its calls
        self.loss = math.nan

    def _owning(self, call, *args):
        before = set(_background())
        try:
            return call(*args)
        finally:
            self.owned |= set(_background()) - before

    def open(self) -> None:
        start = time.perf_counter()
        self._owning(self.logger.open, self.model, self.optimizer, self.run_dir)
        self.open_close += time.perf_counter() - start

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._owning(self._step, x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = self.model(x, y)
        loss.backward()
        self.logger.before_step()
        self.optimizer.step()
        self.logger.after_step(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.loss = loss.item()

    def close(self) -> None:
        start = time.perf_counter()
        self._owning(self.logger.close)
        self.open_close += time.perf_counter() - start


def _round(cfg, vocab, init_state, stream, names, r: int, work_dir: Path, results: dict[str, VariantResult]) -> None:
    """Train every variant in `names` once through `stream`, whole runs one after another in random order.

    Each run is timed end to end as its user waits: the logger's setup, every step back to back
    (whatever background work a logger leaves runs while the next steps train, as in a real run) and
    its `close()`, which waits for all of that work to finish.
    """
    order = random.Random(cfg.seed * 1000 + r)
    for name in order.sample(names, len(names)):
        res = results[name]
        run = _Run(name, cfg, vocab, init_state, work_dir / name)
        gc.collect()  # the last run's garbage is nobody's cost
        cpu_start = _background()
        start = time.perf_counter()
        try:
            run.open()
            for x, y in stream:
                run.step(x, y)
            cpu_end = _background()  # before close(): a logger's threads end there, taking their counts
            run.close()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            _unavailable(res, exc)
            continue
        wall = time.perf_counter() - start
        cpu = sum(v - cpu_start.get(k, 0.0) for k, v in cpu_end.items() if k in run.owned)
        res.end_to_end.append(wall)
        res.step_times.append(run.times[cfg.warmup :])
        res.background_cpu.append(cpu / len(stream))
        res.open_close.append(run.open_close)
        res.final_losses.append(run.loss)
        res.run_dirs.append(run.run_dir)


def _round_lockstep(cfg, vocab, init_state, stream, names, r: int, work_dir: Path,
                    results: dict[str, VariantResult]) -> None:  # fmt: skip
    """Train every variant in `names` through `stream` side by side: step i of each, in a random order,
    then step i + 1.

    A variant's end-to-end time is its setup, the sum of its own steps and its `close()`; with every
    core busy, the CPU time of its background threads and processes is added in full (work that, run
    side by side, may also have slowed a neighbour's steps: an upper bound for that variant).
    """
    order = random.Random(cfg.seed * 1000 + r)
    runs = []
    gc.collect()
    cpu_start = _background()
    for name in order.sample(names, len(names)):
        run = _Run(name, cfg, vocab, init_state, work_dir / name)
        try:
            run.open()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            _unavailable(results[name], exc)
            continue
        runs.append(run)
    for x, y in stream:
        for run in order.sample(runs, len(runs)):
            run.step(x, y)
    cpu_end = _background()
    for run in order.sample(runs, len(runs)):
        run.close()
    busy = cfg.threads >= (os.cpu_count() or 1)
    for run in runs:
        res = results[run.name]
        cpu = sum(v - cpu_start.get(k, 0.0) for k, v in cpu_end.items() if k in run.owned)
        res.end_to_end.append(run.open_close + sum(run.times) + (cpu if busy else 0.0))
        res.step_times.append(run.times[cfg.warmup :])
        res.background_cpu.append(cpu / len(stream))
        res.open_close.append(run.open_close)
        res.final_losses.append(run.loss)
        res.run_dirs.append(run.run_dir)


def _unavailable(res: VariantResult, exc: Exception) -> None:
    if res.name in (BASELINE, "spikedoc"):
        raise exc
    res.unavailable = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def run_benchmark(cfg: BenchConfig, *, work_dir: Path | None = None, progress=None) -> BenchResult:
    """Train every variant `cfg.rounds` times, whole runs in random order within a round, and time them.

    Args:
        cfg: model, data and measurement settings.
        work_dir: where each run writes its logs (`round<r>/<variant>/`); a temporary directory that
            is deleted afterwards when None.
        progress: optional callable taking one line of text after each round.

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
        data, vocab = corpus()
        stream = batches(data, n=cfg.warmup + cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        model = _model(cfg, vocab)
        init_state = {k: v.clone() for k, v in model.state_dict().items()}
        results = {name: VariantResult(name=name) for name in cfg.variants}
        for r in range(cfg.rounds):
            names = [n for n in cfg.variants if results[n].unavailable is None]
            turn = _round_lockstep if cfg.lockstep else _round
            turn(cfg, vocab, init_state, stream, names, r, work_dir / f"round{r}", results)
            if progress:
                medians = ", ".join(
                    f"{n} {1e3 * statistics.median(res.step_times[-1]):.1f}"
                    for n, res in results.items()
                    if res.unavailable is None and len(res.step_times) == r + 1
                )
                progress(f"round {r + 1}/{cfg.rounds}: median ms/step {medians}")
        n_params, n_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
        return BenchResult(config=cfg, results=results, n_params=n_params, n_tensors=n_tensors, vocab=vocab)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="timed steps per variant and round (default 100; 5 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--model", choices=sorted(MODELS), default="small",
                        help="small: the default config (~0.8M parameters, batch 8 x 128); large: d_model 192, batch 16 x 128")
    parser.add_argument("--batch-size", type=int, help="samples per step (default 8): the step's cost scales with it")
    parser.add_argument("--variants", help=f"comma-separated subset, starting with baseline (default: all of {','.join(VARIANTS)})")
    parser.add_argument("--lockstep", action="store_true",
                        help="train the variants side by side, step by step, rather than whole runs in turn")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few steps, prints, does not write BENCHMARKS.md",
    )
    args = parser.parse_args(argv)
    options = {
        "rounds": args.rounds or (2 if args.quick else 5),
        "steps": args.steps or (5 if args.quick else 100),
    }
    if args.quick:
        options["warmup"] = 1
    if args.threads:
        options["threads"] = args.threads
    options.update(MODELS[args.model])
    if args.batch_size:
        options["batch_size"] = args.batch_size
    if args.lockstep:
        options["lockstep"] = True
    if args.variants:
        options["variants"] = tuple(v.strip() for v in args.variants.split(","))
    cfg = BenchConfig(**options)
    result = run_benchmark(cfg, progress=lambda line: print(line, flush=True))
    command = shlex.join(["python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    report = format_report(result, command)
    print(report)
    if not args.quick:
        # One section per model and setting: the idle-core run (one torch thread) and the all-cores run.
        name = "overhead" + ("" if args.model == "small" else f"_{args.model}") + ("" if cfg.threads == 1 else "_all_cores")
        name += "_lockstep" if cfg.lockstep else ""
        name += f"_{cfg.steps}_steps" if cfg.steps > 100 else ""  # a long run: the setup's share amortised
        write_section(name, report)


if __name__ == "__main__":
    main()
