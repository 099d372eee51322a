"""How close clean training comes to the guard's second-moment bound (`spikedoc/guard/moments.py`).

One update can shrink a running second moment's norm by at most its decay (Adam's beta2,
RMSprop's alpha, Adadelta's rho); the guard vetoes a step whose state fell further, with a rounding
allowance (`MARGIN`). This trains clean runs the guard's loop benchmark does not use, the
calibration set, and reports per run the smallest ratio of a tensor's norm to its bound over every
step and tensor (1 is the bound itself; a ratio under 1 - MARGIN would be a false veto):

- the spike suite's byte-level GPT (`spikedoc.demo.training`), AdamW betas (0.9, 0.999), seeds 1 and 2;
- the overhead benchmark's char-level GPT (`bench/_char_gpt.py`, 1 layer x 64), seed 3, with AdamW
  betas (0.9, 0.95), RMSprop (alpha 0.99), Adadelta (rho 0.9) and Adamax (beta2 0.999).

    python bench/second_moment_bound.py [--steps N]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench._char_gpt import CharGPT, batches, corpus  # noqa: E402
from bench._report import machine_line, write_section  # noqa: E402
from spikedoc.demo.training import Recipe, _deterministic, _fresh, _Stream  # noqa: E402
from spikedoc.demo.training import corpus as demo_corpus  # noqa: E402
from spikedoc.guard.moments import MARGIN, second_moments  # noqa: E402
from spikedoc.monitor.statistics import norms  # noqa: E402


def smallest_ratio(step: Callable[[], None], optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Over `steps` calls of `step` (one update each): the smallest norm / (decay x the norm before), any tensor."""
    smallest, before = float("inf"), None
    for _ in range(steps):
        step()
        found = second_moments(optimizer)
        if found is None:
            continue
        which, tensors, decays = found
        now = norms(tensors)
        if before is not None and before[0] == which:
            exact = torch.tensor([d / (1 - max(MARGIN, 4 * torch.finfo(t.dtype).eps)) for d, t in zip(decays, tensors)])
            ratio = now / (exact * before[1]).clamp_min(1e-30)
            smallest = min(smallest, float(ratio[before[1] > 0].min()))
        before = (which, now)
    return smallest


def demo_run(seed: int, steps: int) -> float:
    recipe = Recipe(steps=steps)
    with _deterministic(seed):
        model, opt = _fresh(recipe, seed)
        stream = _Stream(recipe, torch.tensor(list(demo_corpus()), dtype=torch.long), seed)

        def step() -> None:
            ids, mask, _ = stream.next()
            nll = model(input_ids=ids, attention_mask=mask)
            (nll.sum() / mask[:, 1:].sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return smallest_ratio(step, opt, steps)


def char_run(name: str, steps: int) -> float:
    data, vocab = corpus()
    with _deterministic(3):
        model = CharGPT(vocab=vocab, n_layer=1, n_head=2, d_model=64, seq_len=64)
        make = {"adamw_0.95": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.95)),
                "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
                "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
                "adamax": lambda p: torch.optim.Adamax(p, lr=2e-3)}[name]  # fmt: skip
        opt = make(model.parameters())
        it = iter(batches(data, n=steps, batch_size=8, seq_len=64, seed=3))

        def step() -> None:
            x, y = next(it)
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return smallest_ratio(step, opt, steps)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/second_moment_bound.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    rows = [(f"demo GPT, AdamW (0.9, 0.999), seed {s}", demo_run(s, args.steps)) for s in (1, 2)]
    rows += [(f"char GPT, {name}, seed 3", char_run(name, args.steps)) for name in ("adamw_0.95", "rmsprop", "adadelta", "adamax")]
    lines = [
        "## The guard's second-moment bound on clean runs (`bench/second_moment_bound.py`)",
        "",
        (f"Clean runs of {args.steps} steps outside the guard's loop benchmark (CPU, one thread): per run, the smallest "
         "ratio over every step and tensor of the second moment's norm to its bound (its decay times the norm one "
         f"update before; 1 is the bound). The guard vetoes a step under 1 - MARGIN = {1 - MARGIN:g} of it."),
        "",
        f"- {machine_line()} Whole benchmark: {(time.perf_counter() - start) / 60:.1f} min.",
        f"- Command: `{command}`",
        "",
        "| run | smallest ratio to the bound | a false veto |",
        "| --- | ---: | --- |",
    ]
    lines += [f"| {name} | {r:.6f} | {'yes' if r < 1 - MARGIN else 'no'} |" for name, r in rows]
    report = "\n".join(lines)
    write_section("second_moment_bound", report)
    print(report)
    return report


if __name__ == "__main__":
    main()
