"""Workers for the distributed tests: two gloo processes on CPU, each training and recording its rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import spikedoc
from tests.common.models import char_text, make_model

__all__ = ["spawn", "ddp_worker", "fsdp_worker", "one_process_twin", "guard_fsdp_worker", "guard_fsdp_stretch_worker"]


def spawn(worker, tmp_path: Path, world: int = 2, **options) -> list[dict]:
    """Run `worker(rank, world, tmp_path, options)` on `world` gloo ranks; returns what each rank reported."""
    mp.spawn(_entry, args=(worker, world, str(tmp_path), options), nprocs=world, join=True)
    return [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(world)]


def _entry(rank: int, worker, world: int, tmp: str, options: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        report = worker(rank, world, Path(tmp), options)
        (Path(tmp) / f"report-{rank}.json").write_text(json.dumps(report))
        dist.barrier()  # no rank tears the groups down while another still works (rank 0 analyses after a stop)
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, world: int, tmp: Path, options: dict) -> dict:
    """DDP training with the loop's own clip; `nan_step` makes rank `nan_rank`'s loss NaN at that step."""
    net = make_model(0)
    if rank == options.get("nan_rank"):  # numerics gone bad on this rank alone: a NaN inside its forward
        net.blocks[0].register_forward_hook(lambda m, a, out: out * math.nan if net.training_step == options["nan_step"] else out)
    net.training_step = 0
    model = DDP(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = spikedoc.watch(model, opt, run_dir=tmp / "run")
    text, losses, norms = char_text(), [], []
    for step in range(options["steps"]):
        ids, labels = text.batch(world * step + rank)  # each rank its own batch
        net.training_step = step
        loss = model(ids, labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    monitor.close()
    return {"losses": losses, "norms": norms, "dropped": monitor.dropped_rows}


def _count_calls(module, name: str) -> list[int]:
    """Count the calls of `module.name` from now on (the function still runs): a one-element list."""
    original, count = getattr(module, name), [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    setattr(module, name, counted)
    return count


def fsdp_worker(rank: int, world: int, tmp: Path, options: dict) -> dict:
    """FSDP2 (`fully_shard`) training with the loop's own clip; reports the clip's total norms and losses."""
    from torch.distributed.fsdp import fully_shard

    net = make_model(0)
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gathers = _count_calls(dist, "all_gather")  # FSDP2 itself uses all_gather_into_tensor, not this
    monitor = spikedoc.watch(net, opt, run_dir=tmp / "run")
    text, losses, norms = char_text(), [], []
    for step in range(options["steps"]):
        ids, labels = text.batch(world * step + rank)
        loss = net(ids, labels=labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), options.get("clip", 1.0)).full_tensor()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    monitor.close()
    return {"losses": losses, "norms": norms, "dropped": monitor.dropped_rows, "gathers": gathers[0]}


def one_process_twin(run_dir: Path, steps: int, world: int = 2) -> None:
    """The FSDP run on one process: the same model, each step on the ranks' batches together."""
    net = make_model(0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    text = char_text()
    with spikedoc.watch(net, opt, run_dir=run_dir):
        for step in range(steps):
            parts = [text.batch(world * step + r) for r in range(world)]
            ids, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            net(ids, labels=labels).loss.backward()  # the mean over equal batches: FSDP's averaged gradient
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad()


def stop_worker(rank: int, world: int, tmp: Path, options: dict) -> dict:
    """Ranks training on their own (no gradient sync) under the integrations' stop judgement; rank 1's loss turns NaN."""
    from spikedoc.integrations._session import WatchedRun

    net = make_model(0)
    net.blocks[0].register_forward_hook(lambda m, a, out: out * math.nan if rank == 1 and net.step >= options["nan_step"] else out)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    run = WatchedRun(run_dir=tmp / "run", stop=True, watch={})
    run.start(net, opt, tmp / "unused", start_step=None, clip=None)
    text, stopped_at = char_text(), None
    for step in range(options["steps"]):
        net.step = step
        ids, labels = text.batch(world * step + rank)
        net(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if run.should_stop():
            stopped_at = step
            break
    run.finish()
    r = run.recipe
    return {"stopped_at": stopped_at, "own": run.decision is not None, "onset": r and r.onset_step,
            "verdict": r and r.verdict, "analysis_error": r and r.analysis_error}


def _full_state(net, opt) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor of an FSDP2 model, gathered whole (a collective)."""
    full = {}
    for name, p in net.named_parameters():
        full[name] = p.detach().full_tensor().clone()
        for key, value in opt.state.get(p, {}).items():
            full[f"{name}.{key}"] = value.full_tensor().clone() if hasattr(value, "full_tensor") else value.clone()
    return full


def guard_fsdp_worker(rank: int, world: int, tmp: Path, options: dict) -> dict:
    """FSDP2 training under the guard, twice: rolling back from the DCP files, then from the in-memory
    shards. Rank 1 alone multiplies its gradient shards by `factor` on `fault_steps` before the
    first rollback. Reports, per run, the vetoes, rollbacks, the brute-force global gradient norm of
    each step, and whether the state after the rollback equals the one saved."""
    runs = {mode: _guarded_fsdp_run(rank, world, tmp / mode, options, in_memory=mode == "memory")
            for mode in ("disk", "memory")}  # fmt: skip
    return {**runs, "refused": _save_with_nan_on_rank_1(rank, tmp / "refused")}


def guard_fsdp_stretch_worker(rank: int, world: int, tmp: Path, options: dict) -> dict:
    """FSDP2 training under the guard (its defaults, a band warm early) where rank 1 alone trains on
    a stretch of uniformly random characters at data positions `stretch` (none when empty); the
    other rank's batches stay text. Reports the guard's actions and the positions it skipped."""
    from torch.distributed.fsdp import fully_shard

    from spikedoc.detector.streaming import DetectorConfig

    net = make_model(0)
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=options["lr"])
    text = char_text()
    data = [text.batch(world * i + rank) for i in range(options["steps"] + 40)]  # room for skipped batches
    if rank == 1:
        gen = torch.Generator().manual_seed(7)
        for i in options["stretch"]:
            rows = torch.randint(text.vocab_size, (data[i][0].shape[0], data[i][0].shape[1] + 1), generator=gen)
            data[i] = (rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
    guard = spikedoc.Guard(net, opt, data=data, run_dir=tmp / f"stretch-{bool(options['stretch'])}",
                           checkpoint_every=options["checkpoint_every"], max_steps=options["steps"],
                           detector=DetectorConfig(min_history=6, window=20))  # fmt: skip
    for _, (ids, labels) in guard:
        net(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    guard.close()
    actions = [{k: a.get(k) for k in ("kind", "step", "from_step", "to_step", "reason", "positions", "loss_rank")}
               for a in guard.actions]  # fmt: skip
    return {"actions": actions, "skipped": guard.skipped_positions, "step": guard.step}


def _save_with_nan_on_rank_1(rank: int, directory: Path) -> str | None:
    """Save a sharded checkpoint whose rank-1 shard of one weight is NaN: the error each rank gets."""
    from torch.distributed.fsdp import fully_shard

    from spikedoc.guard.checkpoint import CheckpointError, host_copy
    from spikedoc.guard.sharded import ShardedCheckpointStore, training_state

    net = make_model(0)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    state = host_copy(training_state(net, opt))
    if rank == 1:
        state["model"]["tok.weight"][0, 0] = math.nan
    state.update(guard={}, data={}, rng={})
    store = ShardedCheckpointStore(directory, keep=2, rank=rank, model=net)
    try:
        store.save(1, state, healthy=True)
    except CheckpointError as exc:
        return str(exc)
    return None


def _guarded_fsdp_run(rank: int, world: int, run_dir: Path, options: dict, *, in_memory: bool) -> dict:
    from torch.distributed.fsdp import fully_shard

    from spikedoc.detector.streaming import DetectorConfig
    from spikedoc.monitor.distributed import local

    net = make_model(0)
    for block in net.blocks:
        fully_shard(block)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    text = char_text()
    data = [text.batch(world * i + rank) for i in range(200)]
    detector = DetectorConfig(min_history=6, window=20)  # warm early: a short run
    guard = spikedoc.Guard(net, opt, data=data, run_dir=run_dir, checkpoint_every=options["checkpoint_every"],
                           max_steps=options["steps"], keep_in_memory=in_memory, detector=detector)  # fmt: skip
    saved = restored = last = None
    brute: dict[int, float] = {}
    for step, (ids, labels) in guard:
        if step % options["checkpoint_every"] == 0:  # a checkpoint of this step was just taken
            last = _full_state(net, opt)
        if step == options["checkpoint_every"]:
            if guard.rollbacks == 0:
                saved = last
            elif restored is None:
                restored = last
        net(ids, labels=labels).loss.backward()
        if rank == 1 and step in options["fault_steps"] and guard.rollbacks == 0:
            for p in net.parameters():
                local(p.grad).mul_(options["factor"])  # this rank's shards only
        grads = [p.grad.full_tensor() for p in net.parameters()]
        brute.setdefault(step, float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        opt.step()
        opt.zero_grad()
    guard.close()
    # A new guard on the same run directory (a restart) resumes from the newest sharded checkpoint.
    resumed = spikedoc.Guard(net, opt, data=data, run_dir=run_dir, checkpoint_every=options["checkpoint_every"],
                             keep_in_memory=in_memory, detector=detector, resume=True)  # fmt: skip
    resumed_at = resumed.step
    resumed.close()
    return {"resumed_at": resumed_at, "resumed_equals_saved": _same(last, _full_state(net, opt)),
            "restored_equals_saved": _same(saved, restored), **_actions(guard), "brute": brute, "step": guard.step}


def _same(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _actions(guard) -> dict:
    return {"vetoes": [(a["step"], a["grad_norm"], a["reasons"]) for a in guard.actions if a["kind"] == "veto"],
            "rollbacks": [(a["from_step"], a["to_step"], a["reason"]) for a in guard.actions if a["kind"] == "rollback"]}  # fmt: skip
