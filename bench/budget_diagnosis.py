"""What a cost budget costs the diagnosis: the spike suite recorded twice, at the defaults and with `watch(budget=B)`.

    python bench/budget_diagnosis.py [--budget 0.02] [--no-write]

Every run of the spike suite (`bench/spike_suite.py`) is trained twice from the same seed and data,
once with the full statistics every step and once under the budget, into a temporary directory;
`spikedoc.analyze` then judges both. The table puts side by side, per run, the share of steps that
got the full statistics and each incident's onset, cause, verdict and rollback step. Rows that differ
are what the budget's sparser layer statistics changed. Writes the `budget_diagnosis` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spikedoc  # noqa: E402
from bench._report import machine_line, write_section  # noqa: E402
from spikedoc.demo.training import SPECS, generate_run  # noqa: E402


def _verdicts(run: Path) -> str:
    incidents = spikedoc.analyze(run).incidents
    return "; ".join(
        f"{i.onset_step} {i.cause} {i.verdict} " + _rollback(i.recommendation.get("rollback_to_step")) for i in incidents
    ) or "no incident"


def _rollback(step: int | None) -> str:
    return "no rollback" if step is None else f"rollback {step}"


def _full_share(run: Path) -> float:
    steps = spikedoc.load(run).steps
    return float(steps["full_stats"].mean()) if "full_stats" in steps else 1.0


def measure(budget: float, work: Path) -> tuple[list[tuple[str, float, str, str]], int]:
    """Per run: (name, full-statistics share under the budget, dense verdicts, budget verdicts); and how many differ."""
    rows = []
    for spec in SPECS:
        runs = {}
        for label, options in (("dense", {}), ("budget", {"budget": budget})):
            runs[label] = work / label / spec.name
            generate_run(spec, runs[label], checkpoint_dir=work / "ckpt" / label, watch_options=options)
        row = (spec.name, _full_share(runs["budget"]), _verdicts(runs["dense"]), _verdicts(runs["budget"]))
        print(f"{row[0]}: full {row[1]:.2f} | dense: {row[2]} | budget: {row[3]}", flush=True)
        rows.append(row)
    return rows, sum(r[2] != r[3] for r in rows)


def report(rows: list[tuple[str, float, str, str]], differ: int, budget: float, command: str) -> str:
    lines = [
        "## What a cost budget costs the diagnosis (`bench/budget_diagnosis.py`)",
        "",
        f"Each spike-suite run trained twice from the same seed and data: full statistics every step, and "
        f"`watch(budget={budget})`; `spikedoc.analyze` on both. {machine_line()} Command: `{command}`",
        "",
        "| run | steps with full statistics under the budget | dense: onset cause verdict rollback | budget: onset cause verdict rollback |",
        "| --- | ---: | --- | --- |",
    ]
    lines += [f"| {name} | {share:.0%} | {dense} | {under}{' **(differs)**' if dense != under else ''} |" for name, share, dense, under in rows]
    lines += ["", f"{differ} of {len(rows)} runs judged differently under the budget."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows, differ = measure(args.budget, Path(tmp))
    command = shlex.join(["python", "bench/budget_diagnosis.py", *(argv if argv is not None else sys.argv[1:])])
    text = report(rows, differ, args.budget, command)
    print(text)
    if not args.no_write:
        write_section("budget_diagnosis", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
