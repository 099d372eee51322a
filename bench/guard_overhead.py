"""What `spikedoc.Guard` costs per step on top of `spikedoc.watch(clip=1.0)`, per checkpoint, per rollback.

Trains the overhead benchmark's model (`bench/_char_gpt.py`, one torch thread) under a Guard with
no periodic checkpoint, and clocks the guard's own work (`bench/_guard_clock.py`): handing out the
batch, `record`, its forward hook, the judgement inside `optimizer.step()` (the host sync, the
detectors) and the bookkeeping between steps, without what those call into (the optimizer's own
step, the monitor and its statistics, drawing the batch). Reports its median per step and its
share of the median step time (batch in hand to the next batch in hand), then the time one
checkpoint holds the step up (host copy, finiteness check; the file is written in the background)
and until its file has landed, and one rollback from the in-memory copy. Writes its section of BENCHMARKS.md.

    python bench/guard_overhead.py [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench._char_gpt import CharGPT, batches, corpus  # noqa: E402
from bench._report import machine_line, write_section  # noqa: E402

import spikedoc  # noqa: E402
from bench._guard_clock import GuardClock  # noqa: E402

__all__ = ["main", "measure"]


def measure(steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    data, vocab = corpus()
    model = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(data, n=steps, batch_size=16, seq_len=64, seed=seed)
    run_dir = Path(tempfile.mkdtemp(prefix="spikedoc-bench-guard-"))
    try:
        with GuardClock() as clock:
            guard = spikedoc.Guard(model, opt, data=stream, run_dir=run_dir, checkpoint_every=10**9)
            # Per iteration, from one batch in hand to the next: the step and the guard's work between steps.
            marks = []
            for step, (x, y) in guard:
                marks.append(clock.mark())
                model(x, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        t = time.perf_counter()
        guard._checkpoint()
        checkpoint = time.perf_counter() - t  # what the step waits for: the file is written in the background
        guard._store.wait()
        landed = time.perf_counter() - t
        guard.request_rollback()
        guard._steps.pending = None
        t = time.perf_counter()
        decision = guard._judge._decision("requested", guard.step)
        guard._rollback(decision)
        rollback = time.perf_counter() - t
        guard.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    steps = GuardClock.per_step(marks[10:])
    step, own, judgement = (statistics.median(column) for column in zip(*steps))
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": step * 1e3, "guard_ms": own * 1e3,
            "share": own / step, "judgement_ms": judgement * 1e3, "checkpoint_ms": checkpoint * 1e3, "landed_ms": landed * 1e3, "rollback_ms": rollback * 1e3}  # fmt: skip


def checkpoint_costs(rounds: int, steps: int = 60, every: int = 10) -> dict[str, float]:
    """Wall time each checkpoint adds to a run whose state is large enough for the write to matter
    (24 Linear(1024, 1024): 25M parameters, 0.3 GB with AdamW's state), written in the foreground
    or in the background, against the same run without checkpoints; alternating runs, medians."""
    totals: dict[str, list[float]] = {"none": [], "foreground": [], "background": []}
    for r in range(rounds):
        for variant in totals:
            torch.manual_seed(r)
            model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            data = [torch.randn(16, 1024) for _ in range(steps)]
            run_dir = Path(tempfile.mkdtemp(prefix="spikedoc-bench-guard-"))
            try:
                guard = spikedoc.Guard(model, opt, data=data, run_dir=run_dir, max_steps=steps,
                                       checkpoint_every=every if variant != "none" else 10**9,
                                       write_in_background=variant == "background")  # fmt: skip
                start = time.perf_counter()
                for _, x in guard:
                    loss = model(x).pow(2).mean()
                    guard.record(loss=loss)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                guard.close()  # waits for the last file
                totals[variant].append(time.perf_counter() - start)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
    written = steps // every - 1  # steps every, 2 every, ... below `steps` (step 0's is taken before the clock)
    per = {v: statistics.median((t - n) / written for t, n in zip(totals[v], totals["none"])) for v in ("foreground", "background")}
    return {"step_ms": 1e3 * statistics.median(totals["none"]) / steps, "foreground_ms": 1e3 * per["foreground"],
            "background_ms": 1e3 * per["background"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = [measure(args.steps, seed) for seed in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    big = checkpoint_costs(args.rounds)
    text = f"""## Guard overhead (`bench/guard_overhead.py`)

{machine_line()} CharGPT 4x128 ({med['params'] / 1e6:.2f}M parameters), batch 16 x 64, one torch
thread, {args.steps} steps x {args.rounds} rounds, medians. The guard's own work per step is all the
time spent in its code (`bench/_guard_clock.py`: handing out the batch, its forward hook, the
judgement before the update with its host sync and both detectors, the bookkeeping between steps),
without what that code calls into (the optimizer's step, the monitor and its statistics, drawing
the batch); the clock's own wrappers are included, so it is an upper bound. The monitor the guard
includes is measured in `bench/overhead.py`. On CPU all of it delays the step. On an accelerator
whose step is not limited by the host's Python, the work between steps overlaps the device's, and
what the device waits for is the judgement before the update (after its host sync, before the
optimizer's kernels are queued).

| step (ms) | guard's own work per step (ms) | share of the step | of which the judgement before the update (ms) | one checkpoint: the step waits (ms) | its file landed after (ms) | one rollback from memory (ms) |
| --- | --- | --- | --- | --- | --- | --- |
| {med['step_ms']:.1f} | {med['guard_ms']:.3f} | {100 * med['share']:.2f}% | {med['judgement_ms']:.3f} | {med['checkpoint_ms']:.0f} | {med['landed_ms']:.0f} | {med['rollback_ms']:.0f} |

Checkpoint files are written on a background thread while training goes on. What that buys on a
state large enough for the write to matter (24 x Linear(1024, 1024), 25M parameters, 0.3 GB with
AdamW's state; batch 16, {big['step_ms']:.0f} ms per step; a checkpoint every 10 of 60 steps; each
variant against the same run without checkpoints, alternating, {args.rounds} rounds, medians; one
torch thread, so the writer has this machine's other core, as it would on an accelerator's host):

| wall time one checkpoint adds, written in the foreground (ms) | written in the background (ms) |
| --- | --- |
| {big['foreground_ms']:.0f} | {big['background_ms']:.0f} |

Command: `python bench/guard_overhead.py --steps {args.steps} --rounds {args.rounds}`.
"""
    print(text)
    write_section("guard_overhead", text)


if __name__ == "__main__":
    main()
