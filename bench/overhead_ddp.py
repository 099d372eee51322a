"""Monitoring overhead under DDP: two gloo ranks on CPU, one torch thread each, so every core is busy.

Each rank trains the overhead benchmark's model (bench/_char_gpt.py) wrapped in
DistributedDataParallel, once unmonitored (twice: the noise floor), once under `spikedoc.watch`
with the defaults (a 2% cost budget) and once with every statistic on every step (`budget=None`), from the same weights on the same batches. The
variants take turns of `block` steps in an order drawn from a seed shared by the ranks (DDP's
all-reduces need both ranks in the same variant). Overhead = median over rounds of (the variant's
median step time on rank 0 / the baseline's in the same round) - 1.

    python bench/overhead_ddp.py [--rounds N] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench._char_gpt import CharGPT, batches, corpus  # noqa: E402
from bench._loggers import LOGGERS  # noqa: E402
from bench._report import write_section  # noqa: E402

VARIANTS = ("baseline", "baseline_repeat", "spikedoc", "spikedoc_full")


def _rank(rank: int, world: int, tmp: str, rounds: int, steps: int, block: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    data, vocab = corpus()
    stream = batches(data, n=steps + 5, batch_size=8, seq_len=128, seed=100 + rank)
    torch.manual_seed(0)
    init = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=128).state_dict()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = random.Random(0)  # the same order on every rank
    for r in range(rounds):
        runs = {}
        for v in VARIANTS:
            model = CharGPT(vocab=vocab, n_layer=4, n_head=4, d_model=128, seq_len=128)
            model.load_state_dict(init)
            ddp = DDP(model)
            opt = torch.optim.AdamW(ddp.parameters(), lr=3e-4, weight_decay=0.1)
            logger = LOGGERS[v]()
            logger.open(ddp, opt, Path(tmp) / f"r{r}-{v}")
            runs[v] = [ddp, opt, logger, 0, []]
        for start in range(0, steps + 5, block):
            for v in order.sample(VARIANTS, len(VARIANTS)):
                ddp, opt, logger, i, spent = runs[v]
                for i in range(start, min(start + block, steps + 5)):
                    x, y = stream[i]
                    t = time.perf_counter()
                    loss = ddp(x, y)  # the model returns the loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
                    logger.before_step()
                    opt.step()
                    logger.after_step(loss)
                    opt.zero_grad(set_to_none=True)
                    if i >= 5:
                        spent.append(time.perf_counter() - t)
                dist.barrier()
        for v, (_, _, logger, _, spent) in runs.items():
            logger.close()
            times[v].append(statistics.median(spent))
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _report(times: dict[str, list[float]], rounds: int, steps: int, command: str) -> str:
    base = times["baseline"]
    lines = [
        "## Monitoring overhead under DDP (`bench/overhead_ddp.py`)",
        "",
        f"Two gloo ranks on this 2-core CPU, one torch thread each (every core busy), the overhead benchmark's model "
        f"wrapped in DistributedDataParallel, the loop clipping with `clip_grad_norm_`; {rounds} rounds x {steps} timed "
        "steps per variant in turns of 10, rank 0's median step time. Command: `" + command + "`",
        "",
        "| variant | median step ms | overhead % median [min, max] |",
        "| --- | ---: | ---: |",
    ]
    for v in VARIANTS:
        ratios = [t / b - 1 for t, b in zip(times[v], base)]
        ms = 1e3 * statistics.median(times[v])
        cell = "-" if v == "baseline" else f"{100 * statistics.median(ratios):+.1f} [{100 * min(ratios):+.1f}, {100 * max(ratios):+.1f}]"
        lines.append(f"| {v} | {ms:.1f} | {cell} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="a smoke run: prints, does not write BENCHMARKS.md")
    args = parser.parse_args(argv)
    rounds, steps = (1, 5) if args.quick else (args.rounds, args.steps)
    with tempfile.TemporaryDirectory(prefix="spikedoc-ddp-") as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_rank, args=(2, tmp, rounds, steps, 10, out), nprocs=2, join=True)
        times = json.loads(Path(out).read_text())
    command = " ".join(["python", "bench/overhead_ddp.py", *(argv if argv is not None else sys.argv[1:])])
    report = _report(times, rounds, steps, command)
    print(report)
    if not args.quick:
        write_section("overhead_ddp", report)


if __name__ == "__main__":
    main()
