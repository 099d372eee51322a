"""Kill a guarded, recorded training process at random moments and check what it left on disk.

Run as `python -m tests.common.killed RUN_DIR KILLS SEED`; prints one JSON object per kill. Torch and
spikedoc are imported once, then each training process is forked from this one (a fresh interpreter
per kill would cost seconds), trains the tiny transformer under `spikedoc.Guard` (a part and a
guard checkpoint at every step or two, so kills land inside writes too), resumes from the previous
one's checkpoint in the same run directory, and is killed with SIGKILL. The moment cycles through
three kinds: a random delay; as soon as a part file's temporary is seen (inside a part write); as
soon as a guard checkpoint's temporary is seen (inside a checkpoint write).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

import spikedoc
import spikedoc.guard  # noqa: F401 - imported once here (pandas too), not again in every child
from tests.common.guarded import build, loader
from tests.common.models import char_text

#: Steps per part and per guard checkpoint: small, so that most moments fall inside some write.
FLUSH_EVERY, CHECKPOINT_EVERY = 1, 2
#: Longest random delay between a process's first step and its kill (seconds); also the longest
#: wait for a write to catch inside (then the kill comes anyway).
MAX_DELAY = 0.4
MOMENTS = ("random", "part_write", "checkpoint_write")
_SLOTS = struct.Struct("qqq")  # (steps finished, segment, first step), written by the child after every step


def _train(run_dir: Path, shared: mmap.mmap) -> None:
    """The child: train until killed, publishing how many steps it finished (and its segment)."""
    torch.manual_seed(0)
    model, opt, sched = build()
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=run_dir,
                           checkpoint_every=CHECKPOINT_EVERY, keep=2, epochs=10**6,
                           watch_options={"flush_every": FLUSH_EVERY})  # fmt: skip
    segment, first = guard.monitor.segment, None
    for done, (step, batch) in enumerate(guard, start=1):
        first = step if first is None else first
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
        guard.record(loss=loss)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        shared[:_SLOTS.size] = _SLOTS.pack(done, segment, first)


def _temporaries(run_dir: Path) -> dict[str, int]:
    hidden = [p for p in run_dir.rglob(".*") if p.is_file() and ".tmp" in p.name]
    return {"parts": sum(".part-" in p.name for p in hidden), "checkpoints": sum(p.name.startswith(".step-") for p in hidden),
            "other": sum(not (".part-" in p.name or p.name.startswith(".step-")) for p in hidden)}


def _torn(run_dir: Path) -> list[str]:
    """Files with a final name that are not whole: parts Parquet cannot read, checkpoints torch cannot load."""
    torn = []
    for path in sorted(run_dir.rglob("part-*.parquet")):
        try:
            pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - any failure is a torn file
            torn.append(f"{path}: {exc!r}")
    for path in sorted((run_dir / "checkpoints").glob("step-*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            torn.append(f"{path}: {exc!r}")
    try:
        json.loads((run_dir / "meta.json").read_text())
    except Exception as exc:  # noqa: BLE001
        torn.append(f"meta.json: {exc!r}")
    return torn


def _steps_of_segment(run_dir: Path, segment: int) -> list[int]:
    parts = sorted((run_dir / "steps" / "rank=0").glob(f"part-{segment}-*.parquet"))
    return sorted(s for p in parts for s in pq.read_table(p, columns=["step"])["step"].to_pylist())


def _wait_for_a_write(run_dir: Path, moment: str, rng: random.Random) -> None:
    """Return at the kill's moment: after a random delay, or as soon as a write of the kind is under way."""
    if moment == "random":
        time.sleep(rng.uniform(0, MAX_DELAY))
        return
    folders = ([run_dir / t / "rank=0" for t in ("steps", "layers", "events")] if moment == "part_write"
               else [run_dir / "checkpoints"])
    prefix = ".part-" if moment == "part_write" else ".step-"
    deadline = time.monotonic() + MAX_DELAY
    while time.monotonic() < deadline:
        for folder in folders:
            try:
                with os.scandir(folder) as entries:
                    if any(e.name.startswith(prefix) for e in entries):
                        return
            except FileNotFoundError:  # nothing written there yet
                continue


def _wait_for_first_step(pid: int, shared: mmap.mmap, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _SLOTS.unpack(shared[:_SLOTS.size])[0] < 1:
        if time.monotonic() > deadline or os.waitpid(pid, os.WNOHANG) != (0, 0):
            raise RuntimeError("the training process did not finish a step")
        time.sleep(0.002)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (a failed test leaves no trainer behind)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def kill_repeatedly(run_dir: Path, kills: int, seed: int) -> list[dict[str, Any]]:
    """Fork, train, kill: `kills` times on one run directory; what each kill left, as dicts."""
    char_text()  # read once, inherited by every child
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # its first use imports torch._dynamo (2 s): once, here
    rng = random.Random(seed)
    shared = mmap.mmap(-1, _SLOTS.size)
    records: list[dict[str, Any]] = []
    for i in range(kills):
        moment = MOMENTS[i % len(MOMENTS)]
        shared[:_SLOTS.size] = _SLOTS.pack(0, -1, -1)
        left_before = _temporaries(run_dir) if run_dir.exists() else {}
        pid = os.fork()
        if pid == 0:  # the training process
            try:
                _die_with_parent()
                _train(run_dir, shared)
            finally:
                os._exit(1)  # never back into the parent's code
        try:
            _wait_for_first_step(pid, shared)
            left_at_start = _temporaries(run_dir)  # the previous kill's leftovers, once this process has started
            _wait_for_a_write(run_dir, moment, rng)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        done, segment, first = _SLOTS.unpack(shared[:_SLOTS.size])
        records.append({"moment": moment, "finished_steps": done, "segment": segment, "first_step": first,
                        "steps": _steps_of_segment(run_dir, segment), "torn": _torn(run_dir),
                        "left_by_kill": _temporaries(run_dir),
                        "left_before_start": left_before, "left_at_start": left_at_start})
    return records


if __name__ == "__main__":
    torch.set_num_threads(1)
    for record in kill_repeatedly(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])):
        print(json.dumps(record), flush=True)
