"""The guard's cause on the exam's test half, against `spikedoc analyze`'s on the same runs, and what its tests cost.

The exam (`bench/exam.py`) plants faults in tiny training runs and labels each with the cause a
practitioner would name. Here a stratified subset of its test half (odd seeds) is trained again, the
same setup and fault, under `spikedoc.Guard` at its defaults (`clip=` the setup's own clipping,
checkpoints every 40 steps as the exam's loop writes them), and what the guard did is read as a
cause; `analyze`'s cause is that of the cached, unguarded run (`bench/exam.py score`'s matching).

What the guard can name, from what it did (`guard_cause`):

- `numerics`: non-finite vetoes only (skipped, no rollback);
- `data`: vetoes for the loss without a rollback, or a probe that found the data at fault
  (`data_skip`: the last good batch replayed from the current state was in band);
- `schedule`: a rollback whose cause is `lr_schedule` (an upward LR jump before the onset);
- `state`: a rollback whose probe found the state at fault, whose cause is `optimizer_state` (the
  optimizer's second moments collapsed), or one that escalated as recurring;
- `damage`: a rollback on damage with no test of the cause (the guard acted without naming one);
- `none`: the guard did nothing.

The exam's causes fall into the same classes (`CLASS`): bad_batch -> data; lr_schedule and
lr_too_high -> schedule; optimizer_state and state_reset -> state; numerics_rank -> numerics. Both
are scored by class (the guard names no finer cause), analyze also by its exact cause.

Cost of a test: the time of the rollback that restores the good state from host memory, and of a
probe step (the last good batch judged, never applied), against the median training step; the
host memory held for it is one checkpoint's state (the file's size).

    python bench/guard_replay_exam.py [--per-family N] [--clean N] [--no-write]

Needs the exam's runs in its cache (`python bench/exam.py generate`). Exit codes: 0 done, 2 runs
not generated.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
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
from bench._exam_design import CAUSE, Run, design, half_of, labels  # noqa: E402
from bench._exam_score import score_run  # noqa: E402
from bench._exam_train import (  # noqa: E402
    CHECKPOINT_EVERY, Fault, Setup, _bad_batch, _corrupt_state, _first_matrix, _logits_loss, _Loop)  # fmt: skip
from bench._report import machine_line, write_section  # noqa: E402
from bench.exam import BASES, Cache, _default_cache  # noqa: E402
from spikedoc.demo.training import _deterministic  # noqa: E402
from spikedoc.detector.streaming import DetectorConfig  # noqa: E402

__all__ = ["CLASS", "guard_cause", "main", "pick", "train_guarded"]

#: Applied steps before the guard's band is warm: it vetoes only non-finite values before.
_WARM = DetectorConfig().min_history
#: The exam's causes as the classes the guard can tell apart.
CLASS = {"bad_batch": "data", "lr_schedule": "schedule", "lr_too_high": "schedule", "optimizer_state": "state",
         "state_reset": "state", "numerics_rank": "numerics"}  # fmt: skip


def guard_cause(actions: list[dict[str, Any]]) -> str:
    """The cause the guard acted on, as a class (see the module docstring), from its recorded actions.

    An action whose `cause` is one of the exam's causes (`CLASS`) is read as that cause's class.
    """
    named = [CLASS[a["cause"]] for a in actions if a.get("cause") in CLASS]
    if named:
        return named[0]
    rollbacks = [a for a in actions if a["kind"] == "rollback"]
    if rollbacks:
        tests = [a.get("evidence", {}).get("cause_test", {}).get("found") for a in rollbacks]
        if "state" in tests or any(a.get("recurring") for a in rollbacks):
            return "state"
        if any(a["kind"] == "data_skip" for a in actions):
            return "data"
        return "damage"
    if any(a["kind"] == "data_skip" for a in actions):
        return "data"
    vetoes = [a for a in actions if a["kind"] == "veto"]
    if not vetoes:
        return "none"
    if all("nonfinite" in a["reasons"] for a in vetoes):
        return "numerics"
    return "data"


def pick(runs: list[Run], cache: Cache, *, per_family: int, clean: int) -> list[Run]:
    """A stratified subset of the test half: per family the first `per_family` runs (design order)
    whose fault had a visible effect, and the first `clean` clean runs."""
    chosen, taken = [], Counter()
    for setup, fault in runs:
        if half_of(setup) != "test":
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
        self.guard = spikedoc.Guard(self.model, self.optimizer, data=data, run_dir=self.run_dir, clip=s.clip,
                                    checkpoint_every=CHECKPOINT_EVERY, max_steps=s.steps, resume=False)  # fmt: skip
        batches = iter(self.guard)
        while True:
            t0 = time.perf_counter()
            try:
                step, micro = next(batches)
            except StopIteration:
                break
            t1, n = time.perf_counter(), len(self.guard.actions)
            self._plant(step)
            self._train(step, micro)
            self.times.append((step, t1 - t0, time.perf_counter() - t1, n))
        self.guard.close()
        return self.guard

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
        # A resume that restarted the schedule: from its step on, on every pass, the LR counts from 0 again.
        origin = f.step if f is not None and f.family == "lr_restart" and step >= f.step else 0
        lr = self.recipe.lr_at(step - origin) * (f.factor if surging else 1.0)
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
    """One exam run under the guard: its actions, cause, outcome and the cost of its tests."""
    outcome = "finished"
    with _deterministic(setup.seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = _Guarded(setup, fault, work / "run", work / "ckpt")
        try:
            loop.run_guarded()
        except spikedoc.GuardStopped as stop:
            outcome = f"stopped ({stop.diagnosis['reason']})"
    actions = loop.guard.actions
    return {"actions": actions, "cause": guard_cause(actions), "outcome": outcome, "cost": _costs(loop.times, actions),
            "checkpoint_bytes": max((p.stat().st_size for p in (work / "run" / "checkpoints").glob("*.pt")), default=0),
            "param_bytes": sum(p.numel() * p.element_size() for p in loop.model.parameters())}  # fmt: skip


def _probe_step(action: dict[str, Any]) -> int | None:
    test = action.get("cause_test") or action.get("evidence", {}).get("cause_test") or {}
    return test.get("probe_step")


def _costs(times: list[tuple[int, float, float, int]], actions: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seconds of each training step, of each `next()` that rolled back (restoring a good state from
    host memory), and of each probe step (a step whose result the next `next()` reported)."""
    out: dict[str, list[float]] = {"step": [], "rollback": [], "probe": []}
    for i, (step, between, body, n) in enumerate(times):
        before = times[i - 1][3] if i else 0
        if any(a["kind"] == "rollback" for a in actions[before:n]):
            out["rollback"].append(between)
        after = actions[n : times[i + 1][3]] if i + 1 < len(times) else actions[n:]
        if any(_probe_step(a) == step for a in after if a["kind"] in ("rollback", "data_skip")):
            out["probe"].append(body)
        else:
            out["step"].append(body)
    return out


# ------------------------------------------------------------------------------------------ scoring


def _row(setup: Setup, fault: Fault | None, cache: Cache, work: Path) -> dict[str, Any]:
    """One run: its labels, analyze's cause on the cached run, the guard's on a guarded run."""
    lab = labels(setup, fault, cache.record(setup, fault), cache.record(setup, None))
    analyzed = score_run(lab, spikedoc.analyze(cache.folder(setup, fault) / "run"))
    guarded = train_guarded(setup, fault, work)
    truth = CLASS.get(lab["cause"]) if lab["cause"] else None
    got = analyzed.get("got") if fault is not None else ("none" if not analyzed["incidents"] else "alarm")
    return {"family": lab["family"], "kind": lab["kind"], "step": None if fault is None else fault.step,
            "seed": setup.seed, "optimizer": setup.optimizer, "cause": lab["cause"], "class": truth,
            "analyze": got, "analyze_class": CLASS.get(got, got), "guard": guarded["cause"],
            "outcome": guarded["outcome"], "cost": guarded["cost"], "checkpoint_bytes": guarded["checkpoint_bytes"],
            "param_bytes": guarded["param_bytes"],
            "rollbacks": sum(a["kind"] == "rollback" for a in guarded["actions"]),
            "vetoes": sum(a["kind"] == "veto" for a in guarded["actions"])}  # fmt: skip


def _rate(hits: int, n: int) -> str:
    return f"{hits}/{n} ({100 * hits / n:.0f}%)" if n else "0/0"


def _said(runs: list[dict[str, Any]], key: str) -> str:
    return ", ".join(f"{c} {n}" for c, n in Counter(r[key] for r in runs).most_common())


def _ms(xs: list[float], step_ms: float) -> str:
    if not xs:
        return "none measured"
    ms = 1e3 * statistics.median(xs)
    return f"{ms:.1f} ms ({ms / step_ms:.1f} steps), {len(xs)} measured"


def _markdown(rows: list[dict[str, Any]], command: str, seconds: float) -> str:
    faulty = [r for r in rows if r["family"] != "clean"]
    clean = [r for r in rows if r["family"] == "clean"]
    lines = [
        "## The guard's cause on the exam's test half (`bench/guard_replay_exam.py`)",
        "",
        (f"A stratified subset of the exam's test half (odd seeds; per family the first runs in design order whose "
         f"fault had a visible effect, and clean runs): {len(faulty)} faulty and {len(clean)} clean runs, each trained "
         "again under `spikedoc.Guard` at its defaults (the setup's own clip, checkpoints every 40 steps, the same "
         "batches and faults; the bad bytes of a bad batch drawn per data position). The guard's cause is read from "
         "what it did (module docstring: `numerics` non-finite vetoes only; `data` loss vetoes without a rollback or a "
         "probe that found the data at fault; `schedule` a rollback on an LR jump; `state` a rollback whose probe found "
         "the state at fault, or a recurring one; `damage` a rollback with no test of the cause; `none` nothing done). "
         "`analyze`'s cause is that of the cached unguarded run, as `bench/exam.py score` matches it. Both are scored "
         "by class (bad_batch: data; lr_schedule, lr_too_high: schedule; optimizer_state, state_reset: state; "
         "numerics_rank: numerics); analyze also by its exact cause. The guard's one replay is its probe (the last "
         "good batch on the state the vetoes came from, `cause_test` with `replay: other_batches`), run when vetoes for "
         "their loss pile up on a state no update touched since the last healthy step (in the guard's iteration, or "
         "through the draws of a loop drawing its own); a rollback whose cause is `optimizer_state` (the second "
         "moments collapsed, read before the update) is the state's; "
         "a replay of the suspect step with the same batch or with the LR before a jump is not in the guard (an LR "
         "jump is found in the recorded LR series instead)."),
        "",
        f"- {machine_line()} Whole benchmark: {seconds / 60:.1f} min.",
        f"- Command: `{command}`",
        "",
        "| family | runs | guard: right class | analyze: right class | analyze: right cause | guard's causes | analyze's causes |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for fam in CAUSE:
        runs = [r for r in faulty if r["family"] == fam]
        if not runs:
            continue
        g = sum(r["guard"] == r["class"] for r in runs)
        a = sum(r["analyze_class"] == r["class"] for r in runs)
        exact = sum(r["analyze"] == r["cause"] for r in runs)
        lines.append(f"| {fam} ({CLASS[CAUSE[fam]]}) | {len(runs)} | {_rate(g, len(runs))} | {_rate(a, len(runs))} | "
                     f"{_rate(exact, len(runs))} | {_said(runs, 'guard')} | {_said(runs, 'analyze')} |")  # fmt: skip
    g = sum(r["guard"] == r["class"] for r in faulty)
    a = sum(r["analyze_class"] == r["class"] for r in faulty)
    exact = sum(r["analyze"] == r["cause"] for r in faulty)
    lines.append(f"| all faulty | {len(faulty)} | {_rate(g, len(faulty))} | {_rate(a, len(faulty))} | {_rate(exact, len(faulty))} | | |")
    warm = [r for r in faulty if r["step"] >= _WARM]
    lines += ["", f"{len(faulty) - len(warm)} of the {len(faulty)} faults act before step {_WARM}, when the guard's band "
              "is not yet warm (`DetectorConfig.min_history` applied steps): there it vetoes only non-finite values. "
              f"On the {len(warm)} faults after it: guard {_rate(sum(r['guard'] == r['class'] for r in warm), len(warm))}, "
              f"analyze {_rate(sum(r['analyze_class'] == r['class'] for r in warm), len(warm))} right class."]  # fmt: skip
    quiet = sum(r["guard"] == "none" for r in clean)
    lines += ["", f"Clean runs on which the guard did nothing: {_rate(quiet, len(clean))} (analyze without an incident: "
              f"{_rate(sum(r['analyze'] == 'none' for r in clean), len(clean))})."]  # fmt: skip
    lines += ["", *_cost_lines(rows)]
    return "\n".join(lines)


def _cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    steps = [t for r in rows for t in r["cost"]["step"]]
    rollbacks = [t for r in rows for t in r["cost"]["rollback"]]
    probes = [t for r in rows for t in r["cost"]["probe"]]
    step_ms = 1e3 * statistics.median(steps)
    ratio = statistics.median(r["checkpoint_bytes"] / r["param_bytes"] for r in rows if r["checkpoint_bytes"])
    kb = statistics.median(r["checkpoint_bytes"] for r in rows if r["checkpoint_bytes"]) / 1e3
    return [(f"What a test costs, over these runs: a training step {step_ms:.1f} ms (median of {len(steps)}); a rollback "
            f"restoring the good state from host memory {_ms(rollbacks, step_ms)}; a probe step (the last good batch "
            f"judged, never applied) {_ms(probes, step_ms)}. Host memory held for it: one checkpoint's state, {kb:.0f} kB "
            f"(median), {ratio:.1f}x the parameters' bytes (model, AdamW's two moments, the guard's own state).")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=7, help="faulty runs per family (default 7)")
    parser.add_argument("--clean", type=int, default=6, help="clean runs (default 6)")
    parser.add_argument("--cache", type=Path, default=_default_cache(), help="the exam's cache")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    cache = Cache(args.cache)
    try:
        runs = pick(design(BASES), cache, per_family=args.per_family, clean=args.clean)
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
                  f"{row['guard']} ({row['outcome']}, {row['vetoes']} vetoes, {row['rollbacks']} rollbacks), analyze "
                  f"{row['analyze']}", flush=True)  # fmt: skip
    command = shlex.join(["python", "bench/guard_replay_exam.py", *(argv if argv is not None else sys.argv[1:])])
    markdown = _markdown(rows, command, time.perf_counter() - start)
    print(markdown)
    if not args.no_write:
        write_section("guard_replay_exam", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
