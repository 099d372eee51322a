"""The exam: hundreds of real tiny training runs with planted faults and clean twins, and analyze's score on them.

    python bench/exam.py generate [--bases N] [--workers N] [--cache DIR]
    python bench/exam.py score [--half calibration|test] [--bases N] [--cache DIR] [--no-write]

`generate` trains, on CPU, each base setup of a seeded random design (seed, width, depth, batch,
accumulation, AdamW/Adam/SGD/Lion, peak LR, warmup, clipping, a loss- or logits-returning model,
checkpoints numbered, overwritten or none) cleanly, with 2 or 3 faults (bad batches, LR surges,
a resume that restarts the schedule, optimizer-state corruption, weights reset, NaN/inf in the loss,
a gradient or a weight, no warmup at a high LR), with a resume whose LR is rescaled and with one more
LR surge and one more optimizer-state fault, each recorded with `spikedoc.watch` to a real run
directory. Runs are cached under `--cache` (default `~/.cache/spikedoc/exam`, outside the repository),
keyed by their spec, so a rerun trains only what is missing. Even seeds are the calibration half, odd
seeds the test half: defaults are set on the first, the second is scored. `score` runs
`spikedoc.analyze` on each run of the half (both by default) and writes the `exam` section of
BENCHMARKS.md. Exit codes: 0 done, 2 bad arguments or runs not generated yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._exam_design import HALVES, Run, design, half_of, labels  # noqa: E402
from bench._exam_train import Fault, Setup, as_dict  # noqa: E402
from bench._report import machine_line, write_section  # noqa: E402

__all__ = ["BASES", "Cache", "generate", "ci_slice", "main", "score"]

BASES = 120
"""Base setups in the full exam: 120 clean runs and 660 faulty ones (300 dealt round-robin, 120 rescaled
resumes, 120 more LR surges and 120 more optimizer-state faults)."""
_GENERATOR = "exam-1"
"""Bumped when a change to the generator changes what a spec trains (it is part of the cache key)."""


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spikedoc" / "exam"


class Cache:
    """Run directories and records on disk, one folder per run spec."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, setup: Setup, fault: Fault | None) -> Path:
        import torch

        spec = json.dumps(as_dict(setup, fault), sort_keys=True) + _GENERATOR + torch.__version__
        return self.root / hashlib.sha256(spec.encode()).hexdigest()[:16]

    def record(self, setup: Setup, fault: Fault | None) -> dict[str, Any] | None:
        path = self.folder(setup, fault) / "record.json"
        return json.loads(path.read_text()) if path.exists() else None


def _train_one(root: str, setup: Setup, fault: Fault | None) -> float:
    """Train one run into its cache folder (a worker's job); returns its seconds."""
    from bench._exam_train import train

    folder = Cache(Path(root)).folder(setup, fault)
    record = train(setup, fault, folder / "run", folder / "ckpt")
    (folder / "spec.json").write_text(json.dumps(as_dict(setup, fault), indent=1) + "\n")
    (folder / "record.json").write_text(json.dumps(record) + "\n")  # last: its presence marks the run complete
    return record["seconds"]


def generate(runs: list[Run], cache: Cache, workers: int = 1) -> tuple[int, float]:
    """Train the runs (and their twins) missing from `cache`; returns (runs trained, CPU seconds in training)."""
    # In design order (each base's twin, then its faults): the bases done so far form a smaller exam.
    todo = [(s, f) for s, f in dict.fromkeys(runs) if cache.record(s, f) is None]
    seconds = 0.0
    if workers <= 1:
        for i, (setup, fault) in enumerate(todo):
            seconds += _train_one(str(cache.root), setup, fault)
            print(f"\r{i + 1}/{len(todo)} runs trained", end="", flush=True)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_train_one, str(cache.root), s, f) for s, f in todo]
            for i, job in enumerate(jobs):
                seconds += job.result()
                print(f"\r{i + 1}/{len(todo)} runs trained", end="", flush=True)
    print()
    for setup, fault in runs:  # the ground truth next to each run, for anyone who opens the folder
        folder = cache.folder(setup, fault)
        lab = labels(setup, fault, cache.record(setup, fault), cache.record(setup, None))
        (folder / "labels.json").write_text(json.dumps(lab, indent=1) + "\n")
    return len(todo), seconds


def ci_slice(runs: list[Run], *, per_family: int = 1, clean: int = 4) -> list[Run]:
    """A stratified slice of the test half: the fewest base setups that cover every fault family
    `per_family` times and hold `clean` clean runs; of each base, its twin (every label needs it)
    and the faulty runs of the families still short."""
    bases: dict[Setup, list[Run]] = {}
    for setup, fault in runs:
        if half_of(setup) == "test":
            bases.setdefault(setup, []).append((setup, fault))
    need: dict[str, int] = {f.family: per_family for s, f in runs if f is not None}
    chosen: list[Run] = []
    for setup, members in bases.items():
        wanted = [(s, f) for s, f in members if f is not None and need[f.family] > 0]
        if wanted or sum(f is None for _, f in chosen) < clean:
            chosen += [(setup, None), *wanted]
            for _, fault in wanted:
                need[fault.family] -= 1
        if all(n <= 0 for n in need.values()) and sum(f is None for _, f in chosen) >= clean:
            break
    return chosen


def score(runs: list[Run], cache: Cache) -> list[dict[str, Any]]:
    """Analyze every run (generated already) and score it; one row per run, with its `half`."""
    import spikedoc
    from bench._exam_score import score_run

    rows = []
    for setup, fault in runs:
        record, twin = cache.record(setup, fault), cache.record(setup, None)
        if record is None or twin is None:
            raise FileNotFoundError(f"run {cache.folder(setup, fault).name} not generated: run `python bench/exam.py generate` first")
        lab = labels(setup, fault, record, twin)
        row = score_run(lab, spikedoc.analyze(cache.folder(setup, fault) / "run"))
        rows.append(row | {"half": lab["half"], "seed": setup.seed})
    return rows


def _markdown(by_half: dict[str, list[dict[str, Any]]], n_bases: int, train_seconds: float) -> str:
    from bench._exam_score import tables

    lines = [
        "## Exam: analyze on generated runs it was never fitted to",
        "",
        f"Command: `python bench/exam.py generate --bases {n_bases} --workers 1 && python bench/exam.py score --bases {n_bases}` "
        f"(runs cached under `~/.cache/spikedoc/exam`). {n_bases} base setups of a seeded random design, each trained "
        "clean (its twin), with 2 or 3 faults dealt round-robin over the families, with a rescaled resume and with "
        "one more LR surge and optimizer-state fault (bench/README.md, exam); even seeds are the calibration half, "
        "odd seeds the test half. "
        "`analyze` runs with its defaults. Labels are measured against the twin, never taken from analyze: "
        "damage is the held-out eval loss over the twin's, the peak the largest training-loss ratio to the twin's "
        "(same batches), the onset the planted step. An incident matches a fault when its onset is within 2 steps "
        "of the labelled onset range. Runs and scoring: bench/README.md (exam).",
        machine_line(),
    ]
    lines.append(f"Training all {sum(len(rows) for rows in by_half.values())} runs took {train_seconds / 60:.1f} minutes "
                 "of CPU time in all (each run's process time, its monitor threads included).")
    scored = {half: tables(rows) for half, rows in by_half.items() if rows}
    lines += ["", *_targets({half: head for half, (_, head) in scored.items()})]
    for half, (body, _) in scored.items():
        lines += ["", f"### {half.capitalize()} half (seeds {'even' if half == 'calibration' else 'odd'})", "", *body]
    return "\n".join(lines) + "\n"


#: The targets analyze is scored against: (headline key, target share, what it means).
_TARGETS = (
    ("cause_worst_family", 0.95, "right cause, the worst family (must-find runs)"),
    ("recall_must_find", 0.98, "must-find faults found"),
    ("clean_quiet", 1.0, "clean runs without a moderate or severe incident"),
    ("damage_agrees", 0.95, "damage verdict agrees with the twin"),
    ("advice_sane", 1.0, "advice sane"),
)


def _targets(heads: dict[str, dict[str, Any]]) -> list[str]:
    """The headline: each target, and each half's measured share against it."""
    halves = list(heads)
    lines = ["| target | wanted | " + " | ".join(halves) + " |", "| --- | ---: |" + " ---: |" * len(halves)]
    for key, wanted, said in _TARGETS:
        cells = []
        for half in halves:
            hits, n, *which = heads[half][key]  # the worst family also names itself
            share = hits / n if n else float("nan")
            named = f" {which[0]}" if which else ""
            cells.append(f"{hits}/{n} ({100 * share:.0f}%){named}{'' if share >= wanted else ' **missed**'}")
        lines.append(f"| {said} | {100 * wanted:.0f}% | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line: `generate` or `score` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "train the runs missing from the cache"), ("score", "analyze and score")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--bases", type=int, default=BASES, help=f"base setups of the design (default {BASES})")
        p.add_argument("--cache", type=Path, default=_default_cache(), help="folder of the cached runs")
    sub.choices["generate"].add_argument("--workers", type=int, default=1, help="training processes (default 1)")
    sc = sub.choices["score"]
    sc.add_argument("--half", choices=HALVES, default=None, help="score one half only (default: both)")
    sc.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    sc.add_argument("--json", type=Path, default=None, help="also write every run's score row to this file")
    args = parser.parse_args(argv)
    if args.bases < 1 or getattr(args, "workers", 1) < 1:
        print("error: --bases and --workers must be >= 1", file=sys.stderr)
        return 2
    runs, cache = design(args.bases), Cache(args.cache)
    if args.command == "generate":
        start = time.perf_counter()
        n, seconds = generate(runs, cache, args.workers)
        print(f"{n} runs trained in {time.perf_counter() - start:.0f} s ({seconds:.0f} s in training); cache: {cache.root}")
        return 0
    wanted = [r for r in runs if args.half is None or half_of(r[0]) == args.half]
    try:
        rows = score(wanted, cache)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    by_half = {h: [r for r in rows if r["half"] == h] for h in HALVES}
    seconds = sum(cache.record(s, f)["seconds"] for s, f in dict.fromkeys(runs))
    markdown = _markdown(by_half, args.bases, seconds)
    print(markdown)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if not args.no_write and args.half is None:
        write_section("exam", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
