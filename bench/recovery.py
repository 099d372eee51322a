"""Measure the recovery judgement (spikedoc.analysis.recovery) behind its defaults.

    python bench/recovery.py [--reallogs DIR] [--no-write]

Three measurements, each for several settings of `RecoveryConfig.slope_share` and `tolerance_sigma`:

1. False damage on healthy runs: every few steps of the spike suite's clean runs (and, with
   `--reallogs`, of the public modded-nanogpt speedrun logs: 20 random steps per run) is taken as
   if an incident had happened there; a healthy run must judge `recovered` everywhere.
2. Damage on faulty runs against the truth: each faulty run of the spike suite has a clean twin
   (same seed, data and recipe), so its real lasting damage is the median loss ratio to the twin
   over the 20 steps before the judgement's `damage_step`. The judgement should call the runs with
   large true damage damaged, and the ones without it recovered.
3. With `--reallogs`: the verdicts of every incident the detector finds on the 75 healthy speedrun
   logs (target: all `recovered`).

Writes the `recovery` section of BENCHMARKS.md (and prints it).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine_line, write_section  # noqa: E402
from bench.spike_suite import SPECS, load_labels  # noqa: E402
import spikedoc  # noqa: E402
from spikedoc.analysis.detect import find_incidents, flag_series  # noqa: E402
from spikedoc.analysis.recovery import RecoveryConfig, judge_recovery  # noqa: E402

_RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
_SETTINGS = [(1.0, 2.0), (0.5, 2.0), (0.25, 2.0), (0.5, 1.0), (0.5, 3.0)]
_DEFAULT = (RecoveryConfig().slope_share, RecoveryConfig().tolerance_sigma)
# Lasting damage (loss ratio to the clean twin - 1) that a user would act on, and at most this to call a run undamaged.
_TRUE_DAMAGE, _NO_DAMAGE = 0.05, 0.02


def _series(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    frame = frame.sort_values("step").drop_duplicates("step", keep="last")
    return frame["step"].to_numpy(), frame["loss"].to_numpy(dtype=float)


def _healthy(steps: np.ndarray, loss: np.ndarray) -> np.ndarray:
    return ~flag_series(steps, loss)["flagged"].to_numpy()


def _false_damage(runs: list[tuple[np.ndarray, np.ndarray, list[int]]], cfg: RecoveryConfig) -> tuple[int, int]:
    bad = total = 0
    for steps, loss, onsets in runs:
        healthy = _healthy(steps, loss)
        for onset in onsets:
            rec = judge_recovery(steps, loss, onset_step=onset, end_step=onset, healthy=healthy, config=cfg)
            total += 1
            bad += rec is not None and rec.verdict != "recovered"
    return bad, total


def _suite_clean() -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    out = []
    for spec in SPECS:
        if spec.fault is None and (_RUNS / spec.name).exists():
            steps, loss = _series(spikedoc.load(_RUNS / spec.name).steps)
            out.append((steps, loss, list(range(60, int(steps[-1]) - 5, 3))))
    return out


def _real_runs(root: Path, per_run: int = 20) -> list[tuple[np.ndarray, np.ndarray, list[int]]]:
    rng, out = np.random.default_rng(0), []
    for csv in sorted((root / "modded-nanogpt" / "runs").glob("*.csv")):
        steps, loss = _series(pd.read_csv(csv))
        picks = rng.integers(200, len(steps) - 50, per_run)
        out.append((steps, loss, [int(steps[i]) for i in picks]))
    return out


def _faulty() -> list[dict]:
    rows = []
    for spec in SPECS:
        if spec.fault is None or not (_RUNS / spec.name).exists():
            continue
        steps, loss = _series(spikedoc.load(_RUNS / spec.name).steps)
        _, twin = _series(spikedoc.load(_RUNS / spec.twin).steps)
        label = load_labels(_RUNS / spec.name)["incidents"][0]
        found = [i for i in find_incidents(pd.DataFrame({"step": steps, "loss": loss}))
                 if label["onset_range"][0] - 2 <= i.onset_step <= label["affected_range"][1]]  # fmt: skip
        onset, end = (found[0].onset_step, found[0].end_step) if found else (label["onset_range"][0], label["onset_range"][1])
        rows.append({"name": spec.name, "steps": steps, "loss": loss, "twin": twin, "onset": onset, "end": end})
    return rows


def _judge_faulty(row: dict, cfg: RecoveryConfig) -> tuple[str, float, float]:
    steps, loss, twin = row["steps"], row["loss"], row["twin"]
    rec = judge_recovery(steps, loss, onset_step=row["onset"], end_step=row["end"], healthy=_healthy(steps, loss), config=cfg)
    at = int(np.searchsorted(steps, rec.damage_step))
    with np.errstate(invalid="ignore", divide="ignore"):
        truth = float(np.median(loss[max(0, at - 19) : at + 1] / twin[max(0, at - 19) : at + 1]) - 1)
    return rec.verdict, rec.excess_ratio, truth


def measure(reallogs: Path | None) -> str:
    suite, real = _suite_clean(), _real_runs(reallogs) if reallogs else []
    faulty = _faulty()
    lines = [
        "## Recovery and lasting damage (`spikedoc.analysis.recovery`)",
        "",
        "Command: `python bench/recovery.py --reallogs DIR` (DIR: the public logs described in docs/detection.md; "
        "without it the real-log rows are left out). Defaults: " + repr(RecoveryConfig()) + ".",
        machine_line(),
        "",
        "False damage: steps of healthy runs taken as if an incident had happened there (spike suite: every 3rd step "
        "after warmup of each clean run; real logs: 20 random steps per speedrun log); every one should judge `recovered`. "
        f"Damage found: faulty spike-suite runs whose true lasting damage (loss / clean twin - 1 at the judgement's "
        f"damage step) exceeds {_TRUE_DAMAGE:.0%} and are not judged `recovered`; undamaged runs (true damage under "
        f"{_NO_DAMAGE:.0%}) judged `recovered`.",
        "",
        "| slope_share | tolerance_sigma | false damage, spike suite | false damage, real logs | damaged found | undamaged recovered |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for share, tol in _SETTINGS:
        cfg = RecoveryConfig(slope_share=share, tolerance_sigma=tol)
        s_bad, s_tot = _false_damage(suite, cfg)
        r_bad, r_tot = _false_damage(real, cfg) if real else (0, 0)
        judged = [(_judge_faulty(row, cfg), row) for row in faulty]
        damaged = [v for (v, _, t), _ in judged if t > _TRUE_DAMAGE]
        clean = [v for (v, _, t), _ in judged if t < _NO_DAMAGE]
        mark = " (default)" if (share, tol) == _DEFAULT else ""
        lines.append(
            f"| {share}{mark} | {tol} | {s_bad}/{s_tot} | {f'{r_bad}/{r_tot}' if real else 'n/a'} "
            f"| {sum(v != 'recovered' for v in damaged)}/{len(damaged)} | {sum(v == 'recovered' for v in clean)}/{len(clean)} |"
        )
    lines += ["", "Per faulty run at the defaults:", "",
              "| run | onset-end | verdict | excess over trajectory | true damage vs clean twin |",
              "| --- | --- | --- | ---: | ---: |"]
    for row in faulty:
        verdict, excess, truth = _judge_faulty(row, RecoveryConfig())
        lines.append(f"| {row['name']} | {row['onset']}-{row['end']} | {verdict} | {excess:+.1%} | {truth:+.1%} |")
    if reallogs:
        verdicts: Counter = Counter()
        for csv in sorted((reallogs / "modded-nanogpt" / "runs").glob("*.csv")):
            steps, loss = _series(pd.read_csv(csv))
            healthy = _healthy(steps, loss)
            for inc in find_incidents(pd.DataFrame({"step": steps, "loss": loss})):
                rec = judge_recovery(steps, loss, onset_step=inc.onset_step, end_step=inc.end_step, healthy=healthy)
                verdicts[rec.verdict if rec else "no history"] += 1
        lines += ["", "Verdicts of every incident the detector finds on the 75 healthy speedrun logs (target: all recovered): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reallogs", type=Path, default=None, help="folder with modded-nanogpt/runs/*.csv")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if args.reallogs is not None and not (args.reallogs / "modded-nanogpt" / "runs").is_dir():
        parser.error(f"{args.reallogs} has no modded-nanogpt/runs folder")
    markdown = measure(args.reallogs)
    print(markdown)
    if not args.no_write:
        write_section("recovery", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
