"""Does `spikedoc.Guard` heal faulty training runs, against no protection, OLMo-core's skip-step rule and ZClip?

The demo's byte-level GPT (`spikedoc.demo.training`: 2 layers, d_model 32, AdamW lr 3e-3, linear
warmup then cosine decay, batches of 32 slices of Python's own documentation) is trained on CPU,
one thread, deterministic kernels, for `steps` optimizer steps on the first 90% of the corpus, and
evaluated at the end on fixed batches from the last 10% (the same batches for every run). The loss
is the token mean; every method clips the global gradient norm at 1.0 (the common LLM default and
the guard's own), so the comparison isolates the protection. Each fault is trained:

- `none`: the plain loop, `clip_grad_norm_(1.0)`, no protection;
- `skip_step`: OLMo-core's skip-step rule (`SkipStepOptimizer.get_step_factor` with the defaults of
  `SkipStepAdamW`, https://github.com/allenai/OLMo-core, `src/olmo_core/optim/skip_step_optimizer.py`
  at fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d), re-implemented in `SkipStepRule` below;
- `zclip`: the `zclip` package (ZClip, arXiv:2504.02507) with the settings its README shows,
  `ZClip(mode="zscore", alpha=0.97, z_thresh=2.5, clip_option="adaptive_scaling", max_grad_norm=1.0)`,
  `zclip.step(model)` after `backward()`;
- `guard`: `spikedoc.Guard` at its defaults but `checkpoint_every`.

Faults (the same step or data positions for every method; `clean` is the run without one):

- `nonfinite`: one weight is inf for one step's forward only (restored before the optimizer step),
  so that step's loss and gradients are NaN: a transient numerics fault, planted once;
- `corrupt_stretch`: 40 consecutive batches of uniformly random bytes (a corrupt shard); they are
  data, so a replay after a rollback reads them again unless they are skipped;
- `lr_surge`: the LR schedule (a LambdaLR) is 20x for 5 steps mid-run, then resumes; it is the
  schedule, so a replay meets it again;
- `optimizer_state`: AdamW's `exp_avg_sq` is zeroed for every tensor mid-run (exp_avg and the step
  count kept, as a lossy checkpoint converter would), on ordinary data; planted once.

Reported per fault and method: the final eval loss and its ratio to the clean run's (the `none`
method without a fault), steps lost (forward/backward passes recomputed after rollbacks, plus steps
skipped or vetoed in the final run), rollbacks. Then the wall-time cost of the guard on a clean run:
the plain loop, `spikedoc.watch(clip=1.0)` (the monitor alone) and the guard, trained side by side
in one process in alternating turns, checkpoint writes included and counted; and the guard's own
work per step clocked directly in a clean run of its own.

    python bench/guard_recovery.py [--quick] [--steps N] [--rounds N]
    python bench/guard_recovery.py --loops [--quick]

`--loops` instead trains the guard in the loops people write (`bench/_guard_loops.py`): a
nanoGPT-shaped loop and a model with a `-inf` mask buffer, each with its own faults, unguarded and
guarded, and writes its own section.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import spikedoc  # noqa: E402
from bench import _guard_loops  # noqa: E402
from bench._guard_clock import GuardClock  # noqa: E402
from bench._guard_recovery_report import format_loops_report, format_report  # noqa: E402
from bench._report import write_section  # noqa: E402
from spikedoc.demo.training import Recipe, _deterministic, _fresh, _pad, corpus  # noqa: E402

__all__ = ["FAULTS", "METHODS", "TIMED", "BenchConfig", "RunResult", "SkipStepRule", "main", "run_recovery", "run_timing"]

FAULTS = ("clean", "nonfinite", "corrupt_stretch", "lr_surge", "optimizer_state")
METHODS = ("none", "skip_step", "zclip", "guard")


@dataclass(kw_only=True)
class BenchConfig:
    """Run length, where the faults go, and the timing settings."""

    steps: int = 600
    """Optimizer steps per run (the cosine schedule spans them)."""
    batch: int = 32
    """Sequences per batch (the demo recipe's)."""
    checkpoint_every: int = 100
    """The guard's checkpoint interval."""
    fault_step: int = 300
    """Step of the `nonfinite`, `lr_surge` and `optimizer_state` faults; first data position of `corrupt_stretch`."""
    stretch: int = 40
    """Consecutive corrupt batches of `corrupt_stretch`."""
    surge_factor: float = 20.0
    surge_steps: int = 5
    eval_batches: int = 16
    """Held-out batches of `batch` x 64 bytes."""
    rounds: int = 8
    """Timing: rounds, each training every variant for `timing_steps` in alternating turns."""
    timing_steps: int = 200
    block: int = 10
    """Timing: consecutive steps per turn."""
    warmup: int = 5
    """Timing: untimed steps at the start of each round."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "checkpoint_every", "fault_step", "stretch", "surge_steps", "eval_batches",
                     "rounds", "timing_steps", "block"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.fault_step + self.stretch >= self.steps:
            raise ValueError("BenchConfig: fault_step + stretch must fall inside the run (raise steps)")

    @property
    def recipe(self) -> Recipe:
        return Recipe(steps=self.steps, batch=self.batch)


#: `--quick`: a smoke run of every row in well under a minute; its numbers mean nothing (the guard's
#: band is not even warm at the fault).
QUICK = BenchConfig(steps=60, batch=4, checkpoint_every=20, fault_step=40, stretch=5, eval_batches=1, rounds=1,
                    timing_steps=10, block=5, warmup=1)  # fmt: skip


# ------------------------------------------------------------------------------------------ data


class Batches:
    """Batch i of the training stream (random slices of the training part of the corpus), the same
    on every pass, so that a guard can replay it; `corrupt` positions hold random bytes instead."""

    def __init__(self, recipe: Recipe, data: torch.Tensor, seed: int, corrupt: range = range(0)) -> None:
        self.recipe, self.data, self.seed, self.corrupt = recipe, data, seed, corrupt

    def __iter__(self) -> Iterator[dict[str, Any]]:
        r = self.recipe
        for i in range(2 * r.steps):  # twice the run: a guard's skipped batches leave enough
            gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + i)
            lengths = torch.randint(r.min_len, r.max_len + 1, (r.batch,), generator=gen)
            offsets = torch.randint(0, len(self.data) - r.max_len, (r.batch,), generator=gen)
            ids, mask = _pad([self.data[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist())], int(lengths.max()))
            if i in self.corrupt:  # a corrupt shard: uniformly random bytes at the batch's own lengths
                ids = torch.where(mask.bool(), torch.randint(0, 256, ids.shape, generator=gen), ids)
            yield {"position": i, "ids": ids, "mask": mask}


def split_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(corpus()), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def eval_set(held_out: torch.Tensor, n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` fixed batches of `batch` x 64 bytes from the held-out text, evenly spaced."""
    width, starts = 64, torch.linspace(0, len(held_out) - 65, n * batch).long().view(n, batch)
    return [_pad([held_out[s : s + width] for s in row.tolist()], width) for row in starts]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    total = tokens = 0.0
    for ids, mask in batches:
        nll = model(input_ids=ids, attention_mask=mask)  # (B, T-1), zero on padding
        total += float(nll.double().sum())
        tokens += float(mask[:, 1:].sum())
    return total / tokens


# ------------------------------------------------------------------------------------------ peers


class SkipStepRule:
    """OLMo-core's skip-step rule (`SkipStepOptimizer.get_step_factor`), as a decision per step.

    Every step's loss and (pre-clipping) gradient norm join a history of the last
    `rolling_interval_length` + 1 values, skipped steps and non-finite values included, as OLMo-core
    appends them; until the history holds `max(2, rolling_interval_length // 2)` values every step
    proceeds; after that a step proceeds only when its loss and its gradient norm are both at most
    `sigma_factor` standard deviations (`torch.std_mean`, unbiased) above the mean of the values
    before it. So a step is skipped when either is beyond, and also whenever the history holds a
    NaN (a comparison with NaN is false): in OLMo-core a single NaN loss makes the next 128 steps skip.

    One difference, in the peer's favour: OLMo-core's `SkipStepAdamW` multiplies the update by the
    0/1 step factor, so a NaN gradient still reaches the moments (`lerp` by 0 of NaN is NaN); here a
    skipped step simply does not call `optimizer.step()`. For finite gradients the two are the same.
    The rule is measured alone: OLMo-core's `Trainer` also raises on a non-finite training loss when
    it next reduces its metrics, which would end the `nonfinite` run instead.

    Example:
        >>> rule = SkipStepRule()
        >>> all(rule.proceed(2.0 + 0.01 * (i % 3), 0.5 + 0.01 * (i % 2)) for i in range(100))
        True
        >>> rule.proceed(9.0, 0.5)
        False
    """

    def __init__(self, rolling_interval_length: int = 128, sigma_factor: float = 6.0) -> None:
        self.n, self.sigma = rolling_interval_length, sigma_factor
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def proceed(self, loss: float, grad_norm: float) -> bool:
        for history, value in ((self.losses, loss), (self.grad_norms, grad_norm)):
            history.append(float(value))
            del history[: max(0, len(history) - self.n - 1)]
        if len(self.losses) < max(2, self.n // 2):
            return True
        ok = True
        for history in (self.losses, self.grad_norms):
            std, mean = torch.std_mean(torch.tensor(history[:-1], dtype=torch.float64))
            ok &= bool(history[-1] - mean <= self.sigma * std)
        return ok


def _zclip() -> tuple[Any, str | None]:
    try:
        from zclip import ZClip
    except ImportError:
        return None, "the zclip package is not installed (pip install zclip, or the bench extra)"
    return ZClip, None


# ------------------------------------------------------------------------------------------ training


@dataclass(kw_only=True)
class RunResult:
    fault: str
    method: str
    eval_loss: float = math.nan
    passes: int = 0
    """Forward/backward passes computed."""
    recomputed: int = 0
    """Passes thrown away by rollbacks (steps from the checkpoint returned to up to the rollback)."""
    skipped: int = 0
    """Steps of the final run whose update was not applied (skipped by the rule, vetoed by the guard)."""
    rollbacks: int = 0
    rollback_spans: list[int] = field(default_factory=list)
    """Per rollback: the steps between the checkpoint returned to and the step it was decided at."""
    checkpoints: int = 0
    outcome: str = "finished"
    seconds: float = 0.0
    unavailable: str | None = None
    actions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.recomputed + self.skipped


def _schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, surge: range, surge_factor: float) -> Any:
    """The demo's warmup + cosine as a LambdaLR (so a guard can scale it), `surge_factor` times over `surge`."""

    def factor(step: int) -> float:
        return recipe.lr_at(min(step, recipe.steps - 1)) / recipe.lr * (surge_factor if step in surge else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    nll = model(input_ids=ids, attention_mask=mask)  # (B, T-1), zero on padding
    return nll.sum() / mask[:, 1:].sum().clamp(min=1)  # token mean


def train(cfg: BenchConfig, fault: str, method: str, work_dir: Path) -> RunResult:
    """Train one faulty (or clean) run under one method and evaluate it."""
    result = RunResult(fault=fault, method=method)
    ZClip, why = _zclip()
    if method == "zclip" and ZClip is None:
        result.unavailable = why
        return result
    recipe, at = cfg.recipe, cfg.fault_step
    train_data, held_out = split_corpus()
    corrupt = range(at, at + cfg.stretch) if fault == "corrupt_stretch" else range(0)
    surge = range(at, at + cfg.surge_steps) if fault == "lr_surge" else range(0)
    start = time.perf_counter()
    with _deterministic(cfg.seed):
        model, opt = _fresh(recipe, cfg.seed)
        sched = _schedule(opt, recipe, surge, cfg.surge_factor)
        data = Batches(recipe, train_data, cfg.seed, corrupt)
        planted = False

        def plant(step: int, wait: Callable[[], None]) -> tuple[float, Any] | None:
            """Before the step's forward: the one-off faults. Returns what to undo after the backward."""
            nonlocal planted
            if step != at or planted or fault not in ("nonfinite", "optimizer_state"):
                return None
            planted = True
            wait()  # in-place surgery between steps: the monitor's statistics of the last step first
            if fault == "optimizer_state":
                for state in opt.state.values():
                    state["exp_avg_sq"].zero_()
                return None
            weight = model.blocks[1].fc.weight
            with torch.no_grad():
                old, weight[3, 5] = float(weight[3, 5]), math.inf
            return old, weight

        def unplant(undo: tuple[float, Any] | None) -> None:
            if undo is not None:
                with torch.no_grad():
                    undo[1][3, 5] = undo[0]

        if method == "guard":
            _train_guarded(cfg, model, opt, sched, data, work_dir / f"{fault}-guard", plant, unplant, result)
        else:
            rule = SkipStepRule() if method == "skip_step" else None
            zclip = ZClip(mode="zscore", alpha=0.97, z_thresh=2.5, clip_option="adaptive_scaling",
                          max_grad_norm=1.0, clip_factor=1.0) if method == "zclip" else None  # fmt: skip
            for step, batch in zip(range(cfg.steps), data):
                undo = plant(step, lambda: None)
                loss = _loss(model, batch["ids"], batch["mask"])
                loss.backward()
                unplant(undo)
                if zclip is not None:
                    zclip.step(model)
                    apply = True
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the pre-clip norm
                    apply = rule is None or rule.proceed(float(loss.detach()), float(grad_norm))
                if apply:
                    opt.step()
                else:
                    result.skipped += 1
                sched.step()
                opt.zero_grad(set_to_none=True)
                result.passes += 1
        result.eval_loss = evaluate(model, eval_set(held_out, cfg.eval_batches, cfg.batch))
    result.seconds = time.perf_counter() - start
    return result


def _train_guarded(cfg: BenchConfig, model, opt, sched, data, run_dir: Path, plant, unplant, result: RunResult) -> None:
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=data, run_dir=run_dir,
                           checkpoint_every=cfg.checkpoint_every, max_steps=cfg.steps)  # fmt: skip
    applied: dict[int, bool] = {}
    try:
        for step, batch in guard:
            undo = plant(step, guard.monitor.wait)
            loss = _loss(model, batch["ids"], batch["mask"])
            guard.record(loss=loss.detach())
            loss.backward()
            unplant(undo)
            vetoes = guard.vetoes
            opt.step()
            applied[step] = guard.vetoes == vetoes
            sched.step()
            opt.zero_grad(set_to_none=True)
            result.passes += 1
    except spikedoc.GuardStopped as stop:
        result.outcome = f"stopped at step {stop.diagnosis['step']} ({stop.diagnosis['reason']})"
    finally:
        guard.close()
    result.actions = guard.actions
    rollbacks = [a for a in guard.actions if a["kind"] == "rollback"]
    result.rollbacks = len(rollbacks)
    result.rollback_spans = [a["from_step"] - a["to_step"] for a in rollbacks]
    result.recomputed = sum(result.rollback_spans)
    final = guard.step  # steps 0 .. final-1 make up the final run (replays overwrote `applied`)
    result.skipped = sum(not applied.get(s, True) for s in range(final))
    result.checkpoints = sum(1 for e in _events(run_dir) if e == "checkpoint")


def _events(run_dir: Path) -> list[str]:
    try:
        events = spikedoc.load(run_dir).events
    except Exception:  # noqa: BLE001 - a count for the report, never a reason to fail the benchmark
        return []
    return events["kind"].tolist() if "kind" in events else []


def run_recovery(cfg: BenchConfig, work_dir: Path, progress: Callable[[str], None] | None = None) -> dict[tuple[str, str], RunResult]:
    results = {}
    for fault in FAULTS:
        for method in METHODS:
            res = train(cfg, fault, method, work_dir)
            results[fault, method] = res
            if progress:
                progress(f"{fault:>16} {method:>9}: eval {res.eval_loss:.4f}, lost {res.lost}, "
                         f"rollbacks {res.rollbacks}, {res.outcome}, {res.seconds:.0f} s"
                         + (f" ({res.unavailable})" if res.unavailable else ""))  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------ timing

TIMED = ("plain", "plain_repeat", "monitor", "guard")


@dataclass(kw_only=True)
class Timing:
    """Per variant and round: the wall time of each timed step, and the steps whose time holds a checkpoint write."""

    times: dict[str, list[list[float]]] = field(default_factory=lambda: {v: [] for v in TIMED})
    checkpoint_steps: list[list[int]] = field(default_factory=list)
    """Per round: indices (into the guard's timed steps) of the steps that wrote a checkpoint."""
    clocked: list[tuple[float, float, float]] = field(default_factory=list)
    """Per step of a separate clean guard run: the iteration's wall time, the guard's own time in it,
    and the part of that in the judgement before the update."""


class _Timed:
    """One variant's clean run in a round: its own model, optimizer, schedule and (for two of them) spikedoc."""

    def __init__(self, name: str, cfg: BenchConfig, init: dict[str, Any], data: Batches, run_dir: Path) -> None:
        recipe = cfg.recipe
        self.name, self.model = name, _fresh(recipe, cfg.seed)[0]
        self.model.load_state_dict(init)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=recipe.lr, betas=recipe.betas,
                                     weight_decay=recipe.weight_decay)  # fmt: skip
        self.sched = _schedule(self.opt, recipe, range(0), 1.0)
        self.monitor = self.guard = None
        if name == "guard":
            # Checkpoint files written in the foreground: each write's cost lands in its own step and is
            # counted as checkpoint writes (in the background it would spread over the next steps).
            self.guard = spikedoc.Guard(self.model, self.opt, scheduler=self.sched, data=data, run_dir=run_dir,
                                        checkpoint_every=cfg.checkpoint_every, write_in_background=False)  # fmt: skip
            self.batches = iter(self.guard)
        else:
            self.batches = ((None, b) for b in data)
            if name == "monitor":
                self.monitor = spikedoc.watch(self.model, self.opt, run_dir=run_dir, clip=1.0)

    def step(self) -> tuple[float, bool]:
        """One training step; its wall time, and whether a checkpoint was written in it."""
        start = time.perf_counter()
        step, batch = next(self.batches)
        loss = _loss(self.model, batch["ids"], batch["mask"])
        if self.guard is not None:
            self.guard.record(loss=loss.detach())
        elif self.monitor is not None:
            self.monitor.record(loss=loss.detach())
        loss.backward()
        if self.guard is None and self.monitor is None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        # The guard checkpoints between steps, in the `next()` that hands out the batch of a multiple of checkpoint_every.
        wrote = step is not None and step > 0 and step % self.guard.config.checkpoint_every == 0
        return time.perf_counter() - start, wrote

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
        if self.monitor is not None:
            self.monitor.close()


def run_timing(cfg: BenchConfig, work_dir: Path, progress: Callable[[str], None] | None = None) -> Timing:
    """Clean runs of the plain loop (twice: the noise floor), the monitor alone and the guard, in alternating turns."""
    timing = Timing()
    train_data, _ = split_corpus()
    recipe = replace(cfg.recipe, steps=max(cfg.steps, cfg.warmup + cfg.timing_steps))
    cfg = replace(cfg, steps=recipe.steps)
    order = random.Random(cfg.seed)
    with _deterministic(cfg.seed):
        init = _fresh(recipe, cfg.seed)[0].state_dict()
        for r in range(cfg.rounds):
            runs = {v: _Timed(v, cfg, init, Batches(recipe, train_data, cfg.seed), work_dir / f"timing{r}-{v}") for v in TIMED}
            times: dict[str, list[float]] = {v: [] for v in TIMED}
            wrote: list[int] = []
            try:
                for run in runs.values():
                    for _ in range(cfg.warmup):
                        run.step()
                for _ in range(cfg.timing_steps // cfg.block):
                    for v in order.sample(TIMED, len(TIMED)):
                        for _ in range(cfg.block):
                            seconds, checkpoint = runs[v].step()
                            if checkpoint:
                                wrote.append(len(times[v]))
                            times[v].append(seconds)
            finally:
                for run in runs.values():
                    run.close()
            for v in TIMED:
                timing.times[v].append(times[v])
            timing.checkpoint_steps.append(wrote)
            if progress:
                progress(f"timing round {r + 1}/{cfg.rounds}: mean ms/step "
                         + ", ".join(f"{v} {1e3 * statistics.fmean(times[v]):.1f}" for v in TIMED))  # fmt: skip
    return timing


def clock_guard(cfg: BenchConfig, work_dir: Path, timing: Timing) -> None:
    """The guard's own work per step on a clean run, clocked directly (`bench/_guard_clock.py`), in a
    run of its own after the timed rounds: the clock's wrappers would tilt the side-by-side times."""
    train_data, _ = split_corpus()
    recipe = replace(cfg.recipe, steps=max(cfg.steps, cfg.warmup + cfg.timing_steps))
    cfg = replace(cfg, steps=recipe.steps)
    with _deterministic(cfg.seed), GuardClock() as clock:
        run = _Timed("guard", cfg, _fresh(recipe, cfg.seed)[0].state_dict(), Batches(recipe, train_data, cfg.seed),
                     work_dir / "clocked")  # fmt: skip
        try:
            for _ in range(cfg.warmup):
                run.step()
            marks = []
            for _ in range(cfg.timing_steps + 1):  # one mark per batch in hand: the guard's work between steps counts
                marks.append(clock.mark())
                run.step()
        finally:
            run.close()
    timing.clocked = GuardClock.per_step(marks)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every row (tiny, meaningless numbers); prints, writes nothing")
    parser.add_argument("--steps", type=int, help=f"steps per run (default {BenchConfig().steps})")
    parser.add_argument("--rounds", type=int, help=f"timing rounds (default {BenchConfig().rounds})")
    parser.add_argument("--loops", action="store_true", help="the nanoGPT-shaped and -inf-mask loops instead (their own section)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/guard_recovery.py", *(argv if argv is not None else sys.argv[1:])])
    if args.loops:
        return _main_loops(args.quick, command)
    cfg = QUICK if args.quick else BenchConfig()
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    say = (lambda line: print(line, flush=True)) if not args.quick else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spikedoc-guard-recovery-") as tmp:
        results = run_recovery(cfg, Path(tmp), progress=say)
        timing = run_timing(cfg, Path(tmp), progress=say)
        clock_guard(cfg, Path(tmp), timing)
    n_params = sum(p.numel() for p in _fresh(cfg.recipe, cfg.seed)[0].parameters())
    report = format_report(cfg, results, timing, command, time.perf_counter() - start, n_params=n_params)
    print(report)
    if not args.quick:
        write_section("guard_recovery", report)
    return report


def _main_loops(quick: bool, command: str) -> str:
    cfg = _guard_loops.QUICK if quick else _guard_loops.LoopConfig()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spikedoc-guard-loops-") as tmp:
        results = _guard_loops.run_loops(cfg, Path(tmp), progress=None if quick else (lambda line: print(line, flush=True)))
    report = format_loops_report(cfg, results, command, time.perf_counter() - start, healable=_guard_loops.HEALABLE)
    print(report)
    if not quick:
        write_section("guard_recovery_loops", report)
    return report


if __name__ == "__main__":
    main()
