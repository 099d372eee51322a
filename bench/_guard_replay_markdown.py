"""BENCHMARKS.md's section of `bench/guard_replay_exam.py`: its rows (one per run) as tables and sentences."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from bench._exam_design import CAUSE
from bench._report import machine_line
from spikedoc.guard.replay import SUSPECTS

__all__ = ["markdown"]



def _rate(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.0f}%)" if n else "0/0"


def _said(runs: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{c} {n}" for c, n in Counter(r[key] for r in runs).most_common())


def _ms(xs: list[float], step_ms: float) -> str:
    if not xs:
        return "none measured"
    ms = 1e3 * statistics.median(xs)
    return f"{ms:.1f} ms ({ms / step_ms:.1f} steps), {len(xs)} measured"


def _basis(runs: list[dict[str, Any]]) -> str:
    """`data 3 (tested 2, analyze 1), ...`: the guard's causes and what each rests on."""
    out = []
    for cause, n in Counter(r["guard"] for r in runs).most_common():
        bases = Counter(r["basis"] for r in runs if r["guard"] == cause)
        out.append(f"{cause} {n} ({', '.join(f'{b} {k}' for b, k in bases.most_common())})")
    return ", ".join(out)


def _right(runs: list[dict[str, Any]], key: str) -> int:
    return sum(r[key] == r["class"] for r in runs)


def markdown(rows: list[dict[str, Any]], command: str, seconds: float, *, warm_after: int) -> str:
    """The section: per family the guard's and analyze's right classes, what the guard's causes rest
    on, the runs where they differ, the replays run, the clean runs, and what a replay costs.
    `warm_after`: the applied steps before the guard's band is warm."""
    faulty = [r for r in rows if r["family"] != "clean"]
    clean = [r for r in rows if r["family"] == "clean"]
    lines = [
        "## The guard's cause on the exam's test half (`bench/guard_replay_exam.py`)",
        "",
        (f"A stratified subset of the exam's test half (odd seeds; per family the first runs in design order whose "
         f"fault had a visible effect, and clean runs): {len(faulty)} faulty and {len(clean)} clean runs, each trained "
         "again under `spikedoc.Guard` at its defaults (the setup's own clip, checkpoints every 40 steps, the same "
         "batches and faults; the bad bytes of a bad batch drawn per data position). Before it acts on vetoes that pile "
         "up or rolls back, the guard replays the suspect step (`spikedoc/guard/replay.py`): the last healthy batches on "
         "the vetoed state (is the state broken?), the suspect batches again on a good state (does the fault reproduce? "
         "on the vetoed state once found sound, else on the rollback's checkpoint put back from memory), and a rollback "
         "for an LR jump holds the LR before it and skips nothing, so its replay passing the step it rolled back from "
         "confirms the schedule. **The guard's cause** is what its user sees (module docstring): the cause it tested "
         "(confirmed by a replay, or measured) where it acted; else the cause its untested actions name (non-finite "
         "vetoes: numerics, loss vetoes: data, a rollback for an LR jump: schedule); else `analyze` on the guarded run's "
         "own directory (recorded as the exam's runs are), unless a replay ruled that cause out (that order set on the "
         "calibration half). **analyze** is the doctor on the cached "
         "unguarded run, as `bench/exam.py score` matches it; the third column is the doctor on the guarded run alone. "
         "Scored by class (bad_batch: data; lr_schedule, lr_too_high: schedule; optimizer_state, state_reset: state; "
         "numerics_rank: numerics). Nothing is fitted: a replay reproduces at the detector's own 7 band sigmas."),
        "",
        f"- {machine_line()} Whole benchmark: {seconds / 60:.1f} min.",
        f"- Command: `{command}`",
        "",
        "| family | runs | guard: right class | analyze: right class | analyze: right cause | analyze on the guarded run: right class | guard's causes (rests on) | analyze's causes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for fam in CAUSE:
        runs = [r for r in faulty if r["family"] == fam]
        if not runs:
            continue
        exact = sum(r["analyze"] == r["cause"] for r in runs)
        lines.append(f"| {fam} ({runs[0]['class']}) | {len(runs)} | {_rate(_right(runs, 'guard'), len(runs))} | "
                     f"{_rate(_right(runs, 'analyze_class'), len(runs))} | {_rate(exact, len(runs))} | "
                     f"{_rate(_right(runs, 'analyze_guarded_class'), len(runs))} | {_basis(runs)} | {_said(runs, 'analyze')} |")  # fmt: skip
    exact = sum(r["analyze"] == r["cause"] for r in faulty)
    lines.append(f"| all faulty | {len(faulty)} | {_rate(_right(faulty, 'guard'), len(faulty))} | "
                 f"{_rate(_right(faulty, 'analyze_class'), len(faulty))} | {_rate(exact, len(faulty))} | "
                 f"{_rate(_right(faulty, 'analyze_guarded_class'), len(faulty))} | | |")  # fmt: skip
    tested = [r for r in faulty if r["basis"] == "tested"]
    warm = [r for r in faulty if r["step"] >= warm_after]
    lines += ["", f"The guard tested the cause itself on {len(tested)} of the {len(faulty)} faulty runs, right class on "
              f"{_rate(_right(tested, 'guard'), len(tested))} (analyze on the same runs: "
              f"{_rate(_right(tested, 'analyze_class'), len(tested))}). {len(faulty) - len(warm)} of the {len(faulty)} "
              f"faults act before step {warm_after}, when the guard's band is not yet warm (`DetectorConfig.min_history` "
              "applied steps): there it vetoes only non-finite values and leaves the cause to the doctor. On the "
              f"{len(warm)} faults after it: guard {_rate(_right(warm, 'guard'), len(warm))}, analyze "
              f"{_rate(_right(warm, 'analyze_class'), len(warm))} right class."]  # fmt: skip
    differ = [f"{r['family']}/{r['kind']} seed {r['seed']} (truth {r['class']}: guard {r['guard']} by {r['basis']}, analyze "
              f"{r['analyze']}, analyze on the guarded run {r['analyze_guarded']})"
              for r in faulty if (r["guard"] == r["class"]) != (r["analyze_class"] == r["class"])]  # fmt: skip
    lines += ["", "Runs where one is right and the other not: " + ("; ".join(differ) or "none") + ". The exam's loop plants "
              "an `lr_restart` as a resume at the fault's step, a new segment of the unguarded recording; the guarded re-run "
              "stops the job there and starts it again under a new guard that resumes from its newest checkpoint (up to "
              "39 steps earlier), the loop's schedule counting from 0 at the step it resumed. A `state_reset` of kind "
              "`resume_fresh` is planted inside the one guarded run (fresh weights, no optimizer state)."]
    found = Counter(f"{a['replay']} on {a['on']}: {a['found']}" if a.get("on") else f"{a['replay']}: {a['found']}"
                    for r in faulty for a in r["replays"])  # fmt: skip
    lines += ["", "Replays run, by finding: " + (", ".join(f"{k} {n}" for k, n in found.most_common()) or "none") + "."]
    quiet = sum(r["guard"] == "none" and not r["replays"] and r["vetoes"] == r["rollbacks"] == 0 for r in clean)
    lines += ["", f"Clean runs on which the guard did nothing (no veto, no replay, no rollback): {_rate(quiet, len(clean))} "
              f"(analyze without an incident: {_rate(sum(r['analyze'] == 'none' for r in clean), len(clean))})."]  # fmt: skip
    lines += ["", *_cost_lines(rows)]
    return "\n".join(lines)


def _cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    steps = [t for r in rows for t in r["cost"]["step"]]
    rollbacks = [t for r in rows for t in r["cost"]["rollback"]]
    replays = [t for r in rows for t in r["cost"]["replay"]]
    on_checkpoint = [t for r in rows for t in r["cost"]["replay_checkpoint"]]
    step_ms = 1e3 * statistics.median(steps)
    ratio = statistics.median(r["checkpoint_bytes"] / r["param_bytes"] for r in rows if r["checkpoint_bytes"])
    kb = statistics.median(r["checkpoint_bytes"] for r in rows if r["checkpoint_bytes"]) / 1e3
    batch_kb = statistics.median(r["batch_bytes"] for r in rows) / 1e3
    return [(f"What a replay costs, over these runs: a training step {step_ms:.1f} ms (median of {len(steps)}); a replay "
             f"step on the vetoed state (judged, never applied) {_ms(replays, step_ms)}; a replay on the rollback's "
             f"checkpoint, its state put back from host memory and the step {_ms(on_checkpoint, step_ms)}; a rollback "
             f"{_ms(rollbacks, step_ms)}. Host memory: the newest good checkpoint the guard keeps in memory for its "
             f"rollbacks anyway, {kb:.0f} kB (median), {ratio:.1f}x the parameters' bytes (model, AdamW's two moments, "
             f"the guard's own state), nothing more for a replay on it; and the batches of at most {SUSPECTS} suspect "
             f"steps, {batch_kb:.1f} kB each here.")]
