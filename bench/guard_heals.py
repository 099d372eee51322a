"""Does the guard heal the spike suite's faults? Final loss of guarded faulty runs against a guarded clean run.

Trains the demo's tiny GPT (`spikedoc/demo/guarded.py`: the spike suite's recipe and text, 300
steps, CPU) under `spikedoc.Guard` once clean and once per fault the guarded demo plants, and
compares the mean loss of the last 10 steps with the clean run's; the same faults without a guard
are the spike suite's recorded runs (`sample_runs/`), compared with `sample_runs/clean`. Writes its
section of BENCHMARKS.md.

    python bench/guard_heals.py
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import spikedoc  # noqa: E402
from bench._report import machine_line, write_section  # noqa: E402
from spikedoc.demo.guarded import guarded_run  # noqa: E402

FAULTS = ("bad_batch_long", "optimizer_state", "nan")


def _unguarded_final(name: str) -> float:
    loss = spikedoc.load(_ROOT / "sample_runs" / name).steps.sort_values("step")["loss"].to_numpy()
    return float(loss[-10:].mean())


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="spikedoc-bench-guard-heals-"))
    clean = guarded_run(out / "clean", None)
    rows = []
    clean_unguarded = _unguarded_final("clean")
    for fault in FAULTS:
        run = guarded_run(out / fault, fault)
        rollbacks = [a for a in run["actions"] if a["kind"] == "rollback"]
        unguarded = _unguarded_final(fault)
        moves = ", ".join(f"{a['from_step']} -> {a['to_step']}" for a in rollbacks) or "-"
        rows.append(
            f"| {fault} | {run['vetoes']} | {len(rollbacks)} | {moves} "
            f"| {run['final_loss']:.3f} ({100 * (run['final_loss'] / clean['final_loss'] - 1):+.1f}%) "
            f"| {_fmt(unguarded, clean_unguarded)} |"
        )
    text = f"""## The guard on the spike suite's faults (`bench/guard_heals.py`)

{machine_line()} The demo's tiny GPT (spike-suite recipe, 300 steps, one CPU thread) under
`spikedoc.Guard` with its defaults (clip 1.0, checkpoints every 50 steps), each fault planted once;
final loss = mean of the last 10 steps, against the guarded clean run ({clean['final_loss']:.3f},
{clean['vetoes']} vetoes, {clean['rollbacks']} rollbacks). Without the guard: the spike suite's
recorded run of the same fault against `sample_runs/clean` ({clean_unguarded:.3f}; no clipping,
another data stream).

| fault | vetoes | rollbacks | rolled back (from -> to) | final loss, guarded | final loss, unguarded |
| --- | ---: | ---: | --- | --- | --- |
{chr(10).join(rows)}

Command: `python bench/guard_heals.py`.
"""
    print(text)
    write_section("guard_heals", text)


def _fmt(value: float, reference: float) -> str:
    if not math.isfinite(value):
        return "NaN"
    return f"{value:.3f} ({100 * (value / reference - 1):+.1f}%)"


if __name__ == "__main__":
    main()
