"""How far a regenerated spike-suite run drifts from the shipped one across CPU kernels and settings.

The spike suite's runs are trained on one thread with deterministic kernels, but floating-point
results still depend on which kernels a build picks for a CPU (AVX512 vs AVX2 vs scalar, and the
microarchitecture behind the same capability name). This script regenerates the first steps of a
shipped run under each kernel set this machine can run (`ATEN_CPU_CAPABILITY`, one child process
each) and prints the largest relative difference of the recorded losses from the shipped ones: the
evidence behind the tolerance of the regeneration test. It also trains the same steps with the peak
LR changed by 0.1%, the smallest change the test must still catch.

Usage:
    python bench/regeneration_spread.py [--run bad_batch_constant] [--steps 25] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._report import machine_line, write_section  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
_CAPABILITIES = ("default", "avx2", "avx512")


def _child(run: str, steps: int, lr_scale: float) -> None:
    """Regenerate `steps` steps of the shipped run `run` and print its losses as JSON (child process)."""
    import torch

    from bench.spike_suite import SPECS
    from spikedoc.demo.training import Recipe, generate_run

    spec = next(s for s in SPECS if s.name == run)
    recipe = Recipe()
    recipe = replace(recipe, lr=recipe.lr * lr_scale)
    with tempfile.TemporaryDirectory() as scratch:
        record = generate_run(spec, Path(scratch) / "run", recipe=recipe, max_steps=steps, checkpoint_dir=Path(scratch) / "ckpt")
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "loss": record["loss"]}))


def _regenerate(run: str, steps: int, capability: str | None, lr_scale: float = 1.0) -> dict | None:
    env = dict(os.environ)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    cmd = [sys.executable, __file__, "--child", "--run", run, "--steps", str(steps), "--lr-scale", repr(lr_scale)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=_ROOT)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shipped(run: str, steps: int) -> np.ndarray:
    import pyarrow.dataset as ds

    table = ds.dataset(_ROOT / "sample_runs" / run / "steps", format="parquet", partitioning="hive").to_table()
    frame = sorted(zip(table.column("step").to_pylist(), table.column("loss").to_pylist()))
    return np.array([loss for _, loss in frame[:steps]], dtype=np.float64)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) / np.abs(b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="bad_batch_constant")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--no-write", action="store_true", help="print the table without writing BENCHMARKS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lr-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.run, args.steps, args.lr_scale)
        return 0
    shipped = _shipped(args.run, args.steps)
    labels = json.loads((_ROOT / "sample_runs" / args.run / "labels.json").read_text())
    lines = [
        f"## Regenerating a shipped spike-suite run on other CPU kernels ({args.steps} steps)",
        "",
        f"Command: `python bench/regeneration_spread.py --run {args.run} --steps {args.steps}`. The shipped run was "
        f"generated with {labels['generator']['cpu_capability']} kernels; each row regenerates its first {args.steps} "
        "steps in a fresh process (one thread, deterministic kernels) with `ATEN_CPU_CAPABILITY` set, and compares the "
        "recorded losses with the shipped ones. The last row is the smallest real change the regeneration test must catch.",
        machine_line(),
        "",
        "| kernels | max relative difference from shipped | at step | steps bit-equal |",
        "| --- | ---: | ---: | ---: |",
    ]
    for capability in _CAPABILITIES:
        got = _regenerate(args.run, args.steps, capability)
        if got is None:
            lines.append(f"| {capability} | (not runnable on this CPU) | | |")
            continue
        rel = _rel_diff(np.array(got["loss"], dtype=np.float64), shipped)
        equal = int(np.sum(rel == 0))
        lines.append(f"| {capability} (ran as {got['capability']}) | {rel.max():.2e} | {int(rel.argmax())} | {equal}/{args.steps} |")
    changed = _regenerate(args.run, args.steps, None, lr_scale=1.001)
    if changed is not None:
        rel = _rel_diff(np.array(changed["loss"], dtype=np.float64), shipped)
        lines.append(f"| this CPU's own kernels, peak LR x1.001 | {rel.max():.2e} | {int(rel.argmax())} | {int(np.sum(rel == 0))}/{args.steps} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(f"regeneration_spread_{args.steps}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
