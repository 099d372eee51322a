"""Does `spikedoc.Guard` heal faulty runs under FSDP2 (`fully_shard`) on two gloo ranks?

A character transformer (`hooks/plain_torch.py`'s `CharTransformer`: 2 layers, d_model 32, Adam W
lr 3e-3 with a linear warm-up then cosine decay) is sharded with `fully_shard` (each block, then the
root) over two gloo processes on CPU, one thread each, and trained for `steps` optimizer steps on
the first 90% of Python's documentation (each rank its own batches, 8 windows of 32 characters),
then evaluated on fixed batches from the last 10% (the same on both ranks and in every run). Every
run clips the global gradient norm at 1.0: the plain loop with `clip_grad_norm_` on the DTensors,
the guard with its own `clip=1.0`. Each fault is trained unprotected (`none`) and under the guard
(defaults but `checkpoint_every`), and under OLMo-core's skip-step rule (`skip_step`:
`bench.guard_recovery.SkipStepRule` on the loss averaged over ranks, as OLMo-core reduces it, and the
global gradient norm before clipping; a skipped step does not call `optimizer.step()` on any rank):

- `lr_surge`: the schedule (a LambdaLR) is 30x for 12 steps, then resumes;
- `corrupt_stretch`: 30 consecutive batches of uniformly random characters on rank 1 only;
- `nan_batch`: one batch on rank 1 whose loss is NaN (so the step's gradients are, on both ranks
  after the reduce-scatter);
- `optimizer_state`: Adam's `exp_avg_sq` zeroed once, on every rank's shards (`exp_avg` and the
  step count kept).

Reported: the final eval loss and its ratio to the clean unprotected run, vetoes, rollbacks and
data skips, and the wall time of each run.

    python bench/guard_recovery_fsdp2.py [--steps N] [--checkpoint-every N] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.guard_recovery import SkipStepRule  # noqa: E402

FAULTS = ("clean", "lr_surge", "corrupt_stretch", "nan_batch", "optimizer_state")
METHODS = ("none", "skip_step", "guard")


@dataclass(kw_only=True)
class BenchConfig:
    """Run length and where the faults go (as fractions of the run, so --steps scales them)."""

    steps: int = 240
    """Optimizer steps per run."""
    checkpoint_every: int = 20
    """The guard's checkpoint interval."""
    fault_at: float = 0.55
    """Where each fault begins, as a share of `steps` (after the detector's 50-step warm-up)."""
    surge: float = 30.0
    surge_steps: int = 12
    stretch: int = 30
    lr: float = 3e-3
    batch: int = 8
    seq_len: int = 32
    eval_batches: int = 16


def _model(vocab: int, cfg: BenchConfig) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    from hooks.plain_torch import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab, d_model=32, n_layer=2, n_head=4, seq_len=cfg.seq_len)
    for layer in model.blocks.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _batches(ids: torch.Tensor, count: int, cfg: BenchConfig, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        starts = torch.randint(len(ids) - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        rows = torch.stack([ids[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # (B, T + 1)
        out.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:]})
    return out


def _schedule(cfg: BenchConfig, fault: str) -> Any:
    warmup, onset = max(cfg.steps // 20, 1), int(cfg.steps * cfg.fault_at)

    def factor(step: int) -> float:
        base = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (cfg.steps - warmup)))
        surge = cfg.surge if fault == "lr_surge" and onset <= step < onset + cfg.surge_steps else 1.0
        return base * surge

    return factor


def _run(rank: int, fault: str, method: str, cfg: BenchConfig, run_dir: Path) -> dict[str, Any]:
    import spikedoc
    from hooks.plain_torch import text_ids
    from spikedoc.monitor.distributed import local

    ids, vocab = text_ids()
    split = int(len(ids) * 0.9)
    model = _model(vocab, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, fault))
    onset = int(cfg.steps * cfg.fault_at)
    data = _batches(ids[:split], cfg.steps + 100, cfg, seed=1 + rank)  # room for skipped batches
    if fault == "corrupt_stretch" and rank == 1:
        gen = torch.Generator().manual_seed(7)
        for b in data[onset : onset + cfg.stretch]:
            rows = torch.randint(vocab, (cfg.batch, cfg.seq_len + 1), generator=gen)
            b["input_ids"], b["labels"] = rows[:, :-1], rows[:, 1:]
    if fault == "nan_batch" and rank == 1:
        data[onset]["poison"] = True
    zeroed = False
    guard = None
    rule = SkipStepRule() if method == "skip_step" else None
    skipped = 0
    if method == "guard":
        guard = spikedoc.Guard(model, optimizer, scheduler=scheduler, data=data, run_dir=run_dir,
                               checkpoint_every=cfg.checkpoint_every, max_steps=cfg.steps)  # fmt: skip
        steps = iter(guard)
    else:
        steps = enumerate(data[: cfg.steps])
    start = time.perf_counter()
    for step, batch in steps:
        if fault == "optimizer_state" and step == onset and not zeroed:
            zeroed = True
            for state in optimizer.state.values():
                local(state["exp_avg_sq"]).zero_()
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        loss = out["loss"] * math.nan if batch.get("poison") else out["loss"]
        if guard is not None:
            guard.record(loss=loss)
        loss.backward()
        proceed = True
        if guard is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if rule is not None:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                proceed = rule.proceed(float(mean_loss), float(grad_norm))  # the same values on every rank
                skipped += not proceed
        if proceed:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    if guard is not None:
        guard.close()
    with torch.no_grad():
        evals = _batches(ids[split:], cfg.eval_batches, cfg, seed=12345)
        eval_loss = sum(float(model(**b)["loss"]) for b in evals) / len(evals)
    actions = guard.actions if guard is not None else []
    count = lambda kind: sum(a["kind"] == kind for a in actions)  # noqa: E731
    return {"fault": fault, "method": method, "eval_loss": eval_loss, "vetoes": count("veto") + skipped,
            "rollbacks": count("rollback"), "data_skips": sum(len(a["positions"]) for a in actions if a["kind"] == "data_skip"),
            "stopped": any(a["kind"] == "guard_stop" for a in actions), "seconds": seconds}  # fmt: skip


def _worker(rank: int, world: int, tmp: str, cfg: dict[str, Any], runs: list[tuple[str, str]]) -> None:
    torch.set_num_threads(1)
    # The model returns a dict of views; nothing here changes them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        config = BenchConfig(**cfg)
        results = []
        for fault, method in runs:
            try:
                results.append(_run(rank, fault, method, config, Path(tmp) / f"{fault}-{method}"))
            except Exception as exc:  # noqa: BLE001 - a stopped guard is a result too
                results.append({"fault": fault, "method": method, "error": f"{type(exc).__name__}: {exc}"})
            dist.barrier()
        if rank == 0:
            (Path(tmp) / "results.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every fault under every method on two gloo ranks; rank 0's results."""
    runs = [(f, m) for f in FAULTS for m in METHODS]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, tmp, asdict(cfg), runs), nprocs=2, join=True)
        return json.loads((Path(tmp) / "results.json").read_text())


def format_table(results: list[dict[str, Any]], cfg: BenchConfig, command: str, minutes: float) -> str:
    from bench._report import machine_line

    clean = next(r["eval_loss"] for r in results if r["fault"] == "clean" and r["method"] == "none")
    lines = ["## Guard recovery under FSDP2 on two gloo ranks (`bench/guard_recovery_fsdp2.py`)", "",
             f"`{command}`: {cfg.steps} steps, checkpoints every {cfg.checkpoint_every}, faults from step "
             f"{int(cfg.steps * cfg.fault_at)} (the stretch: {cfg.stretch} batches, the surge: {cfg.surge:g}x for "
             f"{cfg.surge_steps} steps); 2 gloo ranks x 1 CPU thread. Eval loss vs the clean unprotected run.", "",
             f"- {machine_line()} Whole benchmark: {minutes:.1f} min.", "",
             "| fault | method | eval loss | vs clean | vetoes | rollbacks | data skipped | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        if "error" in r:
            lines.append(f"| {r['fault']} | {r['method']} | {r['error']} | | | | | |")
            continue
        ratio = r["eval_loss"] / clean - 1
        lines.append(f"| {r['fault']} | {r['method']} | {r['eval_loss']:.4f} | {ratio:+.1%} | {r['vetoes']} | "
                     f"{r['rollbacks']} | {r['data_skips']} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join([*lines, "", *_targets(results, clean)])


def _targets(results: list[dict[str, Any]], clean: float) -> list[str]:
    """The two targets, met or not, from the results."""
    guarded = {r["fault"]: r for r in results if r["method"] == "guard" and "error" not in r}
    healed = {f: guarded[f]["eval_loss"] / clean - 1 for f in FAULTS[1:] if f in guarded}
    far = {f: d for f, d in healed.items() if not abs(d) <= 0.02}  # NaN counts as not healed
    quiet = "clean" in guarded and guarded["clean"]["vetoes"] == 0 and guarded["clean"]["rollbacks"] == 0
    return ["Targets:", "",
            "1. Every healable fault within 2% of the clean run's eval loss under the guard: "
            + ("**met**" if not far and len(healed) == len(FAULTS) - 1 else
               f"**not met** ({', '.join(f'{f}: {d:+.1%}' for f, d in far.items())})") + ".",
            "2. The guarded clean run with no veto and no rollback: " + ("**met**" if quiet else "**not met**") + "."]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=BenchConfig.steps)
    parser.add_argument("--checkpoint-every", type=int, default=BenchConfig.checkpoint_every)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    cfg = BenchConfig(steps=args.steps, checkpoint_every=args.checkpoint_every)
    command = "python bench/guard_recovery_fsdp2.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write")
    start = time.perf_counter()
    results = run(cfg)
    table = format_table(results, cfg, command.strip(), (time.perf_counter() - start) / 60)
    print(table)
    if not args.no_write:
        from bench._report import write_section

        write_section("guard_recovery_fsdp2", table)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
