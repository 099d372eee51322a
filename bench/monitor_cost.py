"""Time spent inside spikedoc's hooks per step, for the `every`/`layer_every` settings in docs/monitor.md.

Trains the overhead benchmark's model (`bench/_char_gpt.py`, one torch thread) once per setting and
round, every setting and an unmonitored baseline stepping in lockstep (step i of each, in a random
order, then step i + 1), and sums the wall time of the monitor's forward and optimizer-step hooks.
A setting's cost is the median over rounds of its mean hook time per step (a mean, so that a setting
that works every tenth step is charged for that step's work spread over all steps), and its share
of the baseline's median step time in the same round. Prints a Markdown table; writes nothing.

    python bench/monitor_cost.py [--rounds N] [--steps N] [--loop-clip MAX_NORM]

`--loop-clip` makes every loop (the baseline too) call `torch.nn.utils.clip_grad_norm_` before the
step, as most loops do; the monitor's observation of that call counts as hook time.
"""

from __future__ import annotations

import argparse
import random
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

import spikedoc  # noqa: E402
from spikedoc.monitor._cycle import StepCycle  # noqa: E402

__all__ = ["SETTINGS", "main", "measure"]

#: (every, layer_every, budget) in table order.
SETTINGS = ((1, 1, None), (1, 10, None), (10, 10, None), (1, 1, 0.02))  # None: every statistic, every step
_HOOKS = ("on_forward_pre", "on_forward", "on_step_pre", "on_step_post", "on_clip")


class _HookClock:
    """Wraps the monitor's hook methods (class-wide, before any monitor registers them) and charges their wall
    time to the step cycle of the monitor that ran them."""

    def __init__(self) -> None:
        self.spent: dict[int, float] = {}
        self._originals = {name: getattr(StepCycle, name) for name in _HOOKS}
        for name, original in self._originals.items():
            setattr(StepCycle, name, self._timed(original))

    def _timed(self, original):
        def hook(cycle, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(cycle, *args, **kwargs)
            finally:
                self.spent[id(cycle)] = self.spent.get(id(cycle), 0.0) + time.perf_counter() - start

        return hook

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(StepCycle, name, original)


def measure(
    *, rounds: int, steps: int, warmup: int = 5, seed: int = 0, loop_clip: float | None = None
) -> dict[tuple[int, int, float | None], tuple[float, float, float]]:
    """Median over rounds of (hook ms per step, its share of the baseline step)."""
    torch.set_num_threads(1)
    data, vocab = corpus()
    stream = batches(data, n=warmup + steps, batch_size=8, seq_len=128, seed=seed)
    torch.manual_seed(seed)
    init = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=128).state_dict()
    clock = _HookClock()
    per_round: dict[tuple[int, int, float | None], list[tuple[float, float]]] = {s: [] for s in SETTINGS}
    try:
        for r in range(rounds):
            runs = []
            for setting in (None, *SETTINGS):
                model = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=128)
                model.load_state_dict(init)
                opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
                monitor = None
                if setting is not None:
                    every, layer_every, budget = setting
                    run_dir = tempfile.mkdtemp(prefix="spikedoc-cost-")
                    monitor = spikedoc.watch(model, opt, run_dir=run_dir, every=every, layer_every=layer_every,
                                             budget=budget)  # fmt: skip
                runs.append((setting, model, opt, monitor, []))
            order = random.Random(seed * 1000 + r)
            for i, (x, y) in enumerate(stream):
                if i == warmup:
                    clock.spent.clear()
                for _, model, opt, _, times in order.sample(runs, len(runs)):
                    start = time.perf_counter()
                    model(x, y).backward()
                    if loop_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), loop_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
            base = statistics.median(runs[0][4])
            for setting, _, _, monitor, _ in runs[1:]:
                hooks = clock.spent.get(id(monitor._cycle), 0.0) / steps
                per_round[setting].append((1e3 * hooks, hooks / base))
                monitor.close()
    finally:
        clock.restore()
    return {s: tuple(statistics.median(v[k] for v in vals) for k in range(2))  # type: ignore[misc]
            for s, vals in per_round.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting and round (default 30)")
    parser.add_argument("--loop-clip", type=float, default=None, metavar="MAX_NORM",
                        help="the loop clips with clip_grad_norm_ at this max norm (default: no clipping)")
    args = parser.parse_args(argv)
    got = measure(rounds=args.rounds, steps=args.steps, loop_clip=args.loop_clip)
    print("| setting | time in the monitor's hooks per step | of the step time |")
    print("| --- | --- | --- |")
    for (every, layer_every, budget), (ms, share) in got.items():
        name = f"every={every}, layer_every={layer_every}" + (f", budget={budget}" if budget else "")
        print(f"| `{name}` | {ms:.2f} ms | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
