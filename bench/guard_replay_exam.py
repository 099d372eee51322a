"""The guard's cause on the exam's test half, against `spikedoc analyze`'s on the same runs, and what its replays cost.

The exam (`bench/exam.py`) plants faults in tiny training runs and labels each with the cause a
practitioner would name. Here a stratified subset of one half (the test half, odd seeds, unless
`--half calibration`) is trained again, the same setup and fault, under `spikedoc.Guard` at its
defaults (`clip=` the setup's own clipping, checkpoints every 40 steps as the exam's loop writes
them). The baseline is `analyze`'s cause on the cached, unguarded run (`bench/exam.py score`'s
matching): the doctor after the fact, without a guard.

The guard's cause for a run is what its user sees (`guard_cause`), in this order:

1. a cause the guard tested, on the first action it took on one (`cause_status` `confirmed` by a
   replay, or `measured`), as a class: `data` (the suspect batches reproduced the fault on a good
   state), `state` (the last healthy batches out of band on the vetoed state, a fault that came
   back from a good checkpoint, or collapsed second moments read), `numerics` for a state found
   broken whose replays were non-finite, or a transient non-finite fault, `schedule` (the replay
   with the LR held before a jump, nothing else changed, passed the step it rolled back from);
2. else what the guard's untested actions name, where they name a cause: vetoes only, all for
   non-finite values `numerics`, else for the loss `data`; a rollback for an LR jump found in the
   LR series `schedule` (a rollback on damage names none);
3. else `analyze`'s cause on the guarded run's own directory (recorded as the exam's runs are,
   every statistic on every step; the guard's actions and replay verdicts included), unless a
   replay ruled it out (the suspect batches in band on the good checkpoint rule out the data);
   `damage` for a rollback it names no cause for, `none` when the guard did nothing.

Scoring analyze on the guarded run for what the guard did not act on (rather than the unguarded
run's diagnosis) keeps the two columns apart: the guarded run is all a guarded user has, and where
the guard vetoed or rolled back, its recording differs from the unguarded run's. Nothing here is
fitted to the test half: a replay reproduces at the detector's own threshold (7 band sigmas); the
order of 2 and 3 was set on the calibration half (`--half calibration`: the doctor on a guarded
run read the single vetoed non-finite step of 5 of its 7 `nonfinite` runs as `bad_batch`, where the
veto's own reason is right; putting the veto first gained those 5 and lost none there).

An `lr_restart` is a resume, as in the exam's loop: the job stops at the fault's step and starts
again under a new guard that resumes from its newest checkpoint, the loop's schedule counting from
0 at the step it resumed (the schedule was not restored); the recording gains a segment, as a
user's resumed run does.

The exam's causes fall into the same classes (`CLASS`): bad_batch -> data; lr_schedule and
lr_too_high -> schedule; optimizer_state and state_reset -> state; numerics_rank -> numerics. Both
are scored by class (the guard names no finer cause), analyze also by its exact cause.

Cost of a replay: the time of a replay step (on the vetoed state: the loop's step; on the
rollback's checkpoint: its state put back from host memory, then the step) and of a rollback,
against the median training step; the host memory held for it: the in-memory checkpoint the
rollback keeps anyway, and the batches of the suspect steps (`SUSPECTS`).

    python bench/guard_replay_exam.py [--per-family N] [--clean N] [--half test|calibration] [--no-write]

Needs the exam's runs in its cache (`python bench/exam.py generate`). Exit codes: 0 done, 2 runs
not generated. `--half calibration` prints only (the section is the test half's).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spikedoc  # noqa: E402
from bench._exam_design import Run, design, half_of, labels  # noqa: E402
from bench._exam_score import score_run  # noqa: E402
from bench._exam_train import (  # noqa: E402
    CHECKPOINT_EVERY, Fault, Setup, _bad_batch, _corrupt_state, _first_matrix, _logits_loss, _Loop)  # fmt: skip
from bench._guard_replay_markdown import markdown  # noqa: E402
from bench._report import write_section  # noqa: E402
from bench.exam import BASES, Cache, _default_cache  # noqa: E402
from spikedoc.analysis.guard_actions import cause_status  # noqa: E402
from spikedoc.demo.training import PAD, _deterministic  # noqa: E402
from spikedoc.detector.streaming import DetectorConfig  # noqa: E402

__all__ = ["CLASS", "guard_cause", "tested_cause", "main", "pick", "train_guarded"]

#: Applied steps before the guard's band is warm: it vetoes only non-finite values before.
_WARM = DetectorConfig().min_history
#: The exam's causes as the classes the guard can tell apart.
CLASS = {"bad_batch": "data", "lr_schedule": "schedule", "lr_too_high": "schedule", "optimizer_state": "state",
         "state_reset": "state", "numerics_rank": "numerics"}  # fmt: skip


def tested_cause(actions: list[dict[str, Any]]) -> tuple[str | None, set[str]]:
    """The class of the first cause the guard tested (None: none), and the classes its replays ruled out."""
    ruled_out: set[str] = set()
    for a in actions:
        detail = {k: v for k, v in a.items() if k != "kind"}
        if a["kind"] == "replay" and a.get("found") == "transient" and a.get("nonfinite"):
            return "numerics", ruled_out
        if a["kind"] not in ("rollback", "data_skip", "guard_stop"):
            continue
        status = cause_status(a["kind"], detail)
        if "data" in status.get("ruled_out", []):
            ruled_out.add("data")
        if status["status"] == "measured":
            return "state", ruled_out
        if status["status"] != "confirmed":
            continue
        found = status["found"]
        test = (detail.get("evidence") if a["kind"] == "rollback" else detail).get("cause_test") or {}
        if found in ("state", "transient") and test.get("nonfinite"):
            return "numerics", ruled_out
        if found in ("data", "state", "schedule"):
            return found, ruled_out
    return None, ruled_out


def _untested(actions: list[dict[str, Any]]) -> str | None:
    """The class the guard's untested actions name (None: none): its vetoes' reasons when it only
    vetoed, an LR jump its first rollback was made for."""
    rollbacks = [a for a in actions if a["kind"] == "rollback"]
    if rollbacks:
        return "schedule" if rollbacks[0].get("cause") == "lr_schedule" else None
    if any(a["kind"] == "data_skip" for a in actions):
        return "data"
    vetoes = [a for a in actions if a["kind"] == "veto"]
    if not vetoes:
        return None
    return "numerics" if all("nonfinite" in a["reasons"] for a in vetoes) else "data"


def guard_cause(actions: list[dict[str, Any]], doctor: str | None) -> tuple[str, str]:
    """The cause a guarded run's user sees, as a class, and what it rests on (`tested`, `untested`,
    `analyze`, `none`): see the module docstring. `doctor`: analyze's cause on the guarded run
    (`missed`, or None for a clean run, when it matched no incident)."""
    tested, ruled_out = tested_cause(actions)
    if tested is not None:
        return tested, "tested"
    untested = _untested(actions)
    if untested is not None:
        return untested, "untested"
    doctor_class = CLASS.get(doctor or "")
    if doctor_class is not None and doctor_class not in ruled_out:
        return doctor_class, "analyze"
    if any(a["kind"] == "rollback" for a in actions):
        return "damage", "untested"
    return "none", "none"


def pick(runs: list[Run], cache: Cache, *, per_family: int, clean: int, half: str = "test") -> list[Run]:
    """A stratified subset of one half: per family the first `per_family` runs (design order)
    whose fault had a visible effect, and the first `clean` clean runs."""
    chosen, taken = [], Counter()
    for setup, fault in runs:
        if half_of(setup) != half:
            continue
        family = "clean" if fault is None else fault.family
        if taken[family] >= (clean if fault is None else per_family):
            continue
        record, twin = cache.record(setup, fault), cache.record(setup, None)
        if record is None or twin is None:
            raise FileNotFoundError(f"run {cache.folder(setup, fault).name} not generated: run `python bench/exam.py generate` first")
        if fault is not None and labels(setup, fault, record, twin)["band"] == "none":
            continue
        chosen.append((setup, fault))
        taken[family] += 1
    return chosen


# ------------------------------------------------------------------------------------------ training


class _Guarded(_Loop):
    """The exam's loop under the guard: the same setup, schedule, batches and planted fault.

    Data faults are tied to the data position (the step's batches, handed out by the guard), so a
    replay meets them again unless they are skipped; the bad bytes are drawn from a generator seeded
    by the position (the same on every pass). The LR faults act on the loop's step on every pass;
    the others are planted once, on the first pass."""

    def __init__(self, setup: Setup, fault: Fault | None, run_dir: Path, ckpt_dir: Path) -> None:
        super().__init__(setup, fault, run_dir, ckpt_dir)
        self.planted = False
        self.restart: int | None = None
        """The step an `lr_restart` fault's resume continued from (the guard's newest checkpoint)."""
        self.earlier_actions: list[dict[str, Any]] = []
        """The actions of the guard before a resume (`lr_restart`), which closed it."""
        self.times: list[tuple[int, float, float, int]] = []
        """Per iteration: the step, the guard's time between steps (`next()`), the step's own time, and
        how many actions the guard had recorded when it handed the step out."""

    def _watch(self, start_step: int | None) -> Any:
        return None  # the guard's own monitor records the run

    def batches_at(self, position: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k, f = self.setup.accum, self.fault
        bad = f is not None and f.family == "bad_batch" and f.step <= position < f.step + f.length
        source = f.step if bad and f.kind == "repeated" else position  # a loader stuck on one batch
        source %= len(self.batches) // k  # past the end (skipped batches leave steps to fill): from the start again
        out = [(b["ids"], b["mask"]) for b in self.batches[source * k : source * k + k]]
        if bad and f.kind != "repeated":
            gen = torch.Generator().manual_seed(7919 * (self.setup.seed + 1) + position)
            out = [_bad_batch(f.kind, ids, mask, gen) for ids, mask in out]
        return out

    def run_guarded(self) -> spikedoc.Guard:
        s = self.setup
        data = [self.batches_at(i) for i in range(2 * s.steps)]
        # Recorded as the exam's unguarded runs are (`_Loop._watch`): the doctor reads the same statistics in both.
        self.guard = self._open_guard(data, resume=False)
        batches = iter(self.guard)
        f = self.fault
        while True:
            t0 = time.perf_counter()
            try:
                step, micro = next(batches)
            except StopIteration:
                break
            if f is not None and f.family == "lr_restart" and step == f.step and self.restart is None:
                # The job stops here and is started again: the guard resumes from its newest
                # checkpoint, and the loop's schedule, not restored, counts from 0 at that step (or,
                # for a rescaled resume, goes on with its LR `factor` times too high).
                self.guard.close()
                self.earlier_actions += self.guard.actions
                self.guard = self._open_guard(data, resume=True)
                self.restart = self.guard.step
                batches = iter(self.guard)
                continue
            t1, n = time.perf_counter(), len(self.earlier_actions) + len(self.guard.actions)
            self._plant(step)
            self._train(step, micro)
            self.times.append((step, t1 - t0, time.perf_counter() - t1, n))
        self.guard.close()
        return self.guard

    def _open_guard(self, data: list[Any], *, resume: bool) -> spikedoc.Guard:
        s = self.setup
        return spikedoc.Guard(self.model, self.optimizer, data=data, run_dir=self.run_dir, clip=s.clip,
                              checkpoint_every=CHECKPOINT_EVERY, max_steps=s.steps, resume=resume,
                              watch_options={"layer_every": 1, "budget": None, "pad_token_id": PAD})  # fmt: skip

    def _plant(self, step: int) -> None:
        f = self.fault
        if f is None or f.step != step or f.family in ("bad_batch", "lr_surge", "lr_restart", "instability") or self.planted:
            return
        self.planted = True
        if f.family == "state_reset":  # fresh weights (and, for a fresh resume, no optimizer state)
            fresh, _ = self._fresh(self.setup.seed + 1000)
            with torch.no_grad():
                for p, q in zip(self.model.parameters(), fresh.parameters()):
                    p.copy_(q)
            if f.kind == "resume_fresh":
                self.optimizer.state.clear()
        elif f.family == "optimizer_state":
            _corrupt_state(f.kind, self.optimizer)
        elif f.kind == "weight_inf":
            with torch.no_grad():
                _first_matrix(self.model)[3, 5] = math.inf

    def _train(self, step: int, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        f = self.fault
        surging = f is not None and f.family == "lr_surge" and f.step <= step < f.step + f.length
        # A resume that restarted the schedule: from its step on, on every pass, the LR counts from 0
        # again; a rescaled one: from its step on, the LR is `factor` times the schedule's.
        resumed = self.restart is not None and step >= self.restart
        origin = self.restart if resumed and f.kind == "restart" else 0
        rescaled = resumed and f.kind == "rescaled"
        lr = self.recipe.lr_at(step - origin) * (f.factor if surging or rescaled else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        poison = f is not None and f.family == "nonfinite" and f.step == step and not self.guard.rollbacks
        for i, (ids, mask) in enumerate(micro):
            if self.setup.output == "loss":
                loss = self.model(input_ids=ids, attention_mask=mask)
            else:
                loss = _logits_loss(self.model(input_ids=ids), ids, mask)
            if poison and i == 0 and f.kind in ("loss_nan", "loss_inf"):
                loss = loss * (math.nan if f.kind == "loss_nan" else math.inf)
            self.guard.record(loss=loss.detach())
            (loss / self.setup.accum).backward()
        if poison and f.kind == "grad_nan":
            with torch.no_grad():
                _first_matrix(self.model).grad[2, 1] = math.nan
        self.optimizer.step()  # the guard clips (clip=) and judges inside it
        self.optimizer.zero_grad(set_to_none=True)


def train_guarded(setup: Setup, fault: Fault | None, work: Path) -> dict[str, Any]:
    """One exam run under the guard (recorded in `work / "run"`): its actions, outcome, the cost of
    its replays and the memory they hold."""
    outcome = "finished"
    with _deterministic(setup.seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = _Guarded(setup, fault, work / "run", work / "ckpt")
        try:
            loop.run_guarded()
        except spikedoc.GuardStopped as stop:
            outcome = f"stopped ({stop.diagnosis['reason']})"
    actions = loop.earlier_actions + loop.guard.actions
    step_bytes = [sum(t.numel() * t.element_size() for pair in b for t in pair) for b in loop.guard._tests.last_good.batches] \
        if loop.guard._tests.last_good is not None else [0]  # fmt: skip
    return {"actions": actions, "outcome": outcome, "cost": _costs(loop.times, actions), "batch_bytes": sum(step_bytes),
            "checkpoint_bytes": max((p.stat().st_size for p in (work / "run" / "checkpoints").glob("*.pt")), default=0),
            "param_bytes": sum(p.numel() * p.element_size() for p in loop.model.parameters())}  # fmt: skip


def _costs(times: list[tuple[int, float, float, int]], actions: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds of each training step, of each `next()` that rolled back (restoring a good state from
    host memory), and of each replay step (one whose finding the next `next()` recorded): on the
    vetoed state the loop's step, on the checkpoint also the `next()` that put its state back."""
    out: dict[str, list[float]] = {"step": [], "rollback": [], "replay": [], "replay_checkpoint": []}
    for i, (step, between, body, n) in enumerate(times):
        before = times[i - 1][3] if i else 0
        if any(a["kind"] == "rollback" for a in actions[before:n]):
            out["rollback"].append(between)
        after = actions[n : times[i + 1][3]] if i + 1 < len(times) else actions[n:]
        replay = next((a for a in after if a["kind"] == "replay" and a.get("probe_step") == step), None)
        if replay is None:
            out["step"].append(body)
        elif replay.get("on") == "checkpoint":
            out["replay_checkpoint"].append(between + body)
        else:
            out["replay"].append(body)
    return out


# ------------------------------------------------------------------------------------------ scoring


def _row(setup: Setup, fault: Fault | None, cache: Cache, work: Path) -> dict[str, Any]:
    """One run: its labels, analyze's cause on the cached run, the guard's on a guarded run."""
    lab = labels(setup, fault, cache.record(setup, fault), cache.record(setup, None))
    analyzed = score_run(lab, spikedoc.analyze(cache.folder(setup, fault) / "run"))
    guarded = train_guarded(setup, fault, work)
    on_guarded = score_run(lab, spikedoc.analyze(work / "run"))
    truth = CLASS.get(lab["cause"]) if lab["cause"] else None
    got = analyzed.get("got") if fault is not None else ("none" if not analyzed["incidents"] else "alarm")
    doctor = on_guarded.get("got") if fault is not None else None
    cause, basis = guard_cause(guarded["actions"], doctor)
    return {"family": lab["family"], "kind": lab["kind"], "step": None if fault is None else fault.step,
            "seed": setup.seed, "optimizer": setup.optimizer, "cause": lab["cause"], "class": truth,
            "analyze": got, "analyze_class": CLASS.get(got, got), "guard": cause, "basis": basis,
            "untested": _untested(guarded["actions"]),
            "analyze_guarded": doctor, "analyze_guarded_class": CLASS.get(doctor or "", doctor),
            "outcome": guarded["outcome"], "cost": guarded["cost"], "checkpoint_bytes": guarded["checkpoint_bytes"],
            "param_bytes": guarded["param_bytes"], "batch_bytes": guarded["batch_bytes"],
            "replays": [a for a in guarded["actions"] if a["kind"] == "replay"],
            "rollbacks": sum(a["kind"] == "rollback" for a in guarded["actions"]),
            "vetoes": sum(a["kind"] == "veto" for a in guarded["actions"])}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=7, help="faulty runs per family (default 7)")
    parser.add_argument("--clean", type=int, default=6, help="clean runs (default 6)")
    parser.add_argument("--cache", type=Path, default=_default_cache(), help="the exam's cache")
    parser.add_argument("--half", choices=("test", "calibration"), default="test", help="the exam's half (default test)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    cache = Cache(args.cache)
    try:
        runs = pick(design(BASES), cache, per_family=args.per_family, clean=args.clean, half=args.half)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="spikedoc-guard-exam-") as tmp:
        for i, (setup, fault) in enumerate(runs):
            row = _row(setup, fault, cache, Path(tmp) / str(i))
            rows.append(row)
            print(f"{i + 1}/{len(runs)} {row['family']}/{row['kind']} seed {row['seed']}: truth {row['class']}, guard "
                  f"{row['guard']} by {row['basis']} ({row['outcome']}, {row['vetoes']} vetoes, {row['rollbacks']} rollbacks, "
                  f"replays {[(a['replay'], a['found']) for a in row['replays']]}), analyze {row['analyze']}, on the "
                  f"guarded run {row['analyze_guarded']}, the guard's own reading {row['untested']}", flush=True)  # fmt: skip
    command = shlex.join(["python", "bench/guard_replay_exam.py", *(argv if argv is not None else sys.argv[1:])])
    section = markdown(rows, command, time.perf_counter() - start, warm_after=_WARM)
    print(section)
    if not args.no_write and args.half == "test":
        write_section("guard_replay_exam", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
