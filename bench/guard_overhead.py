"""What `spikedoc.Guard` costs per step on top of `spikedoc.watch(clip=1.0)`, per checkpoint, per rollback.

Trains the overhead benchmark's model (`bench/_char_gpt.py`, one torch thread) under a Guard with
no periodic checkpoint, and clocks the guard's own work: the judgement before each optimizer step
(the host sync, the detectors; the optimizer's own step and the monitor's statistics, whose
gradient norm the guard judges, excluded) and the
bookkeeping between steps (excluding drawing the batch). Reports its median per step and its share
of the median step time, then the time of one checkpoint (host copy, finiteness check, write) and
one rollback from the in-memory copy. Writes its section of BENCHMARKS.md.

    python bench/guard_overhead.py [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
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
from spikedoc.guard.guard import Guard  # noqa: E402

__all__ = ["main", "measure"]


class _Clock:
    """Wall time of the guard's judgement and between-step work, minus what it calls into."""

    def __init__(self) -> None:
        self.guard = self.inner = 0.0
        self._judge, self._finish = Guard._guarded_step, Guard._finish_step

        def guarded_step(guard, *args, **kwargs):
            start = time.perf_counter()
            original = guard._original_step
            inner = [0.0]

            def excluded(fn):  # the optimizer's step, and the monitor's statistics the guard asks for first
                def timed(*a, **k):
                    t = time.perf_counter()
                    try:
                        return fn(*a, **k)
                    finally:
                        inner[0] += time.perf_counter() - t

                return timed

            guard._original_step = excluded(type(guard.optimizer).step.__get__(guard.optimizer))
            guard.monitor.grad_norm = excluded(guard.monitor.grad_norm)
            try:
                return self._judge(guard, *args, **kwargs)
            finally:
                guard._original_step = original
                del guard.monitor.grad_norm
                self.guard += time.perf_counter() - start - inner[0]

        def finish_step(guard):
            start = time.perf_counter()
            try:
                return self._finish(guard)
            finally:
                self.guard += time.perf_counter() - start

        Guard._guarded_step, Guard._finish_step = guarded_step, finish_step

    def restore(self) -> None:
        Guard._guarded_step, Guard._finish_step = self._judge, self._finish


def measure(steps: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    data, vocab = corpus()
    model = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = batches(data, n=steps, batch_size=16, seq_len=64, seed=seed)
    run_dir = Path(tempfile.mkdtemp(prefix="spikedoc-bench-guard-"))
    clock = _Clock()
    try:
        guard = spikedoc.Guard(model, opt, data=stream, run_dir=run_dir, checkpoint_every=10**9)
        times, spent = [], []
        for step, (x, y) in guard:
            start, before = time.perf_counter(), clock.guard
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            spent.append(clock.guard - before)
        t = time.perf_counter()
        guard._checkpoint()
        checkpoint = time.perf_counter() - t
        guard.request_rollback()
        guard._pending = None
        t = time.perf_counter()
        decision = guard._judge._decision("requested", guard.step)
        guard._rollback(decision)
        rollback = time.perf_counter() - t
        guard.close()
    finally:
        clock.restore()
    step = statistics.median(times[10:])
    own = statistics.median(spent[11:])  # the between-step part of step i lands in step i + 1's window
    return {"params": sum(p.numel() for p in model.parameters()), "step_ms": step * 1e3, "guard_ms": own * 1e3,
            "share": own / step, "checkpoint_ms": checkpoint * 1e3, "rollback_ms": rollback * 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds = [measure(args.steps, seed) for seed in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    text = f"""## Guard overhead (`bench/guard_overhead.py`)

{machine_line()} CharGPT 4x128 ({med['params'] / 1e6:.2f}M parameters), batch 16 x 64, one torch
thread, {args.steps} steps x {args.rounds} rounds, medians. The guard's own work per step is the
judgement before the update (one host sync, both detectors; the optimizer's step and the
monitor's statistics excluded) plus its bookkeeping between steps; the monitor it includes is
measured in `bench/overhead.py`.

| step (ms) | guard's own work per step (ms) | share of the step | one checkpoint (ms) | one rollback from memory (ms) |
| --- | --- | --- | --- | --- |
| {med['step_ms']:.1f} | {med['guard_ms']:.3f} | {100 * med['share']:.2f}% | {med['checkpoint_ms']:.0f} | {med['rollback_ms']:.0f} |

Command: `python bench/guard_overhead.py --steps {args.steps} --rounds {args.rounds}`.
"""
    print(text)
    write_section("guard_overhead", text)


if __name__ == "__main__":
    main()
