"""The overhead benchmark's BENCHMARKS.md section: method, machine, command, table and verdict."""

from __future__ import annotations

import math
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from bench._loggers import BASELINE, LOGGERS
from bench._report import machine_line

if TYPE_CHECKING:
    from bench.overhead import BenchResult

__all__ = ["format_report"]

_ROOT = Path(__file__).resolve().parent.parent


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    return ordered[lo] + (ordered[min(lo + 1, len(ordered) - 1)] - ordered[lo]) * (pos - lo)


def _revision() -> str:
    """The commit measured, and whether spikedoc/ had uncommitted changes (numbers then are not reproducible)."""
    try:
        git = ["git", "-C", str(_ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "spikedoc"], capture_output=True, text=True, check=True
        )
        return f"commit {head.stdout.strip()}" + (" with uncommitted changes in spikedoc/" if dirty.stdout else "")
    except (OSError, subprocess.CalledProcessError):
        return "an unknown revision (not a git checkout)"


def _ratios(result: BenchResult, name: str) -> list[float]:
    """Per round: this variant's end-to-end time over the baseline's in the same round."""
    res, base = result.results[name], result.results[BASELINE]
    return [t / b for t, b in zip(res.end_to_end, base.end_to_end)]


def _method(lockstep: bool, background: str) -> str:
    """How the variants were run and timed, for the section's first paragraph."""
    common = (
        "Every variant trains the same model from the same initial weights on the same batches, each "
        "with its own model copy and logger, in one process. "
    )
    if lockstep:
        timing = (
            "The variants train side by side: step i of each, in a random order, then step i + 1, so a "
            "burst of load from another process falls on every variant alike rather than on one whole run. "
            "A variant's end-to-end time is its logger's setup, the sum of its own steps and its `close()`, "
            "which waits for its background work; with every core busy, the CPU time of its background "
            "threads and processes is added in full (an upper bound: run side by side, part of that work "
            "slowed its neighbours' steps instead). "
        )
    else:
        timing = (
            "Each run is timed end to end as its user waits: the logger's setup, every step back to back "
            "(a logger's background work overlapping its later steps, as in a real run, never drained "
            "outside the clock) and its `close()`, which waits for that work. Within a round the variants "
            "run one after another in a random order, so load from other processes hits all of them alike. "
        )
    return common + timing + (
        "Overhead = median over rounds of (the variant's end-to-end time / the baseline's in the same "
        "round) - 1, with the interquartile range [Q1, Q3] and min / max over rounds. `baseline_repeat` "
        "is a second, identical unmonitored run: its overhead is the measurement's noise floor. Median "
        "step ms: forward + backward + `optimizer.step()` + the logger's own work + `zero_grad`, warmup "
        "steps excluded. Background CPU = CPU time per step of the threads and child processes that "
        "appeared while the logger opened, stepped or closed (spikedoc's Parquet writer, TensorBoard's "
        f"event writer, wandb's service process); {background}. Same losses: every variant ended on "
        "bit-for-bit the baseline's loss (the loggers only observe)."
    )


def format_report(result: BenchResult, command: str) -> str:
    """The BENCHMARKS.md section: what was run, on what, the table, and whether the target is met."""
    cfg = result.config
    base_loss = result.results[BASELINE].final_losses
    title = f"## Monitoring overhead (`bench/overhead.py`), d_model {cfg.d_model} x {cfg.n_layer} layers, " + (
        "one torch thread" if cfg.threads == 1 else f"every core busy ({cfg.threads} torch threads)"
    ) + (", variants side by side" if cfg.lockstep else "")
    background = (
        "with one torch thread they can run on the otherwise idle second core"
        if cfg.threads == 1 else
        f"with {cfg.threads} torch threads no core is idle, so that work competes with training"
    )
    lines = [
        title,
        "",
        _method(cfg.lockstep, background),
        "",
        f"- Model: {cfg.describe(result.n_params, result.vocab)}",
        f"- {machine_line()} spikedoc at {_revision()}.",
        f"- Command: `{command}`",
        "",
        (
            "| variant | end-to-end s | overhead % median [IQR] | min / max % | median step ms "
            "| background CPU ms/step | open + close s | same losses | records |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    overheads = {}
    for name in cfg.variants:
        res = result.results[name]
        if res.unavailable or not res.step_times:
            lines.append(f"| {name} | not run | - | - | - | - | - | - | could not run here: {res.unavailable} |")
            continue
        ratios = _ratios(result, name)
        overheads[name] = statistics.median(ratios) - 1
        q1, q3 = (100 * (_quantile(ratios, q) - 1) for q in (0.25, 0.75))
        base = name == BASELINE
        cells = [
            name,
            f"{statistics.median(res.end_to_end):.2f}",
            "-" if base else f"{100 * overheads[name]:+.1f} [{q1:+.1f}, {q3:+.1f}]",
            "-" if base else f"{100 * (min(ratios) - 1):+.1f} / {100 * (max(ratios) - 1):+.1f}",
            f"{1e3 * statistics.median(t for run in res.step_times for t in run):.1f}",
            f"{1e3 * statistics.median(res.background_cpu):.1f}",
            f"{statistics.median(res.open_close):.2f}",
            "yes" if res.final_losses == base_loss else "NO",
            LOGGERS[name].records,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "spikedoc" in overheads:
        peers = {k: v for k, v in overheads.items() if k not in (BASELINE, "baseline_repeat") and not k.startswith("spikedoc")}
        ours = overheads["spikedoc"]
        met = ours <= 0.03 and all(ours < v for v in peers.values())
        cheapest = min(peers, key=peers.get) if peers else None
        lines += [
            "",
            (
                f"Target: spikedoc's end-to-end overhead <= 3% and below every peer's. Measured "
                f"{100 * ours:+.1f}%"
                + (f"; cheapest peer {cheapest} {100 * peers[cheapest]:+.1f}%" if cheapest else "")
                + f": **{'met' if met else 'not met'}**."
                + (f" With every statistic on every step (`budget=None`): {100 * overheads['spikedoc_full']:+.1f}%."
                   if "spikedoc_full" in overheads else "")
                + (f" The noise floor (`baseline_repeat`, the same unmonitored run) is "
                   f"{100 * overheads['baseline_repeat']:+.1f}%: differences of that size are the machine, not the "
                   "loggers." if "baseline_repeat" in overheads else "")
            ),
        ]
    return "\n".join(lines)
