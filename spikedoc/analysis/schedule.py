"""Scheduled LR jumps: warm restarts told apart from discontinuities, by the recorded scheduler or the LR series.

A cosine schedule with warm restarts (SGDR, Loshchilov & Hutter 2017; torch's
`CosineAnnealingWarmRestarts`) jumps back to its peak LR at the end of every period: by the
test of `lr_discontinuities` that is a jump, but it is the schedule's. A restart is recognised as
scheduled when all of these hold:

- it goes up to the group's peak LR (the highest it reached before, within 1%), not beyond;
- it is not at a resume (a resume that restarted the schedule is the classic discontinuity);
- it ends a period: with a scheduler recorded (`watch(..., scheduler=...)`), it is one of the
  restart steps its `T_0`, `T_mult` and phase predict, or, where the phase is unknown, a period
  `T_0 * T_mult**k` after a cycle start (the start of the lineage or of a resumed segment, or the
  previous restart); with none recorded, the run must show at least two restarts whose periods
  grow by one integer factor (equal periods, or each `T_mult` times the one before), as the LR
  series of any SGDR schedule does.

An LR multiplied by a bug lands above the peak, a resume is never scheduled, and a restart at the
wrong step ends no period: all three are still flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import fmt
from spikedoc.analysis.context import lr_columns

__all__ = ["restart_settings", "scheduled_restarts", "restarted_at_resume", "restart_path"]

# A restart goes back to the peak LR to within this relative tolerance.
_PEAK_TOLERANCE = 0.01
# Steps after a resume whose LR must retrace the lineage's first steps for a schedule restarted from
# its start: the whole warmup of most recipes, and enough that a constant stretch alone never matches.
_RETRACE_STEPS = 5
# Where the restarted schedule shows, in steps after the resume: at the resume itself (a scheduler built
# after the optimizer's state was loaded sets the LR it starts from), or one step later (a scheduler
# built first sets its LR, then `optimizer.load_state_dict` puts back each group's `lr` from the
# checkpoint: the first resumed step runs at the LR the run left, the scheduler's first `step()` then
# sets its own). Not a threshold: the two orders a resuming script can take.
_RESTART_LAGS = (0, 1)
# An LR change smaller than this share is no restart (a constant LR retraces itself trivially).
_MIN_RESTART_CHANGE = 0.2
# Periods T_0 * T_mult**k considered (T_mult = 2 reaches 2**40 * T_0 steps).
_MAX_PERIODS = 40


def _schedulers(entries: Any, offset: int | None = 0) -> list[tuple[dict[str, Any], int | None]]:
    """Every recorded scheduler with the step offset at which it started (None when unknown)."""
    out: list[tuple[dict[str, Any], int | None]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
        out.append((entry, offset))
        inner = settings.get("schedulers")
        if isinstance(inner, list):
            milestones = settings.get("_milestones") or []
            starts = [0] + [int(m) for m in milestones if isinstance(m, (int, float))]
            for k, sub in enumerate(inner):
                start = None if offset is None or k >= len(starts) else offset + starts[k]
                out += _schedulers([sub], start)
    return out


def restart_settings(meta: dict[str, Any] | None) -> list[tuple[int | None, int, int]] | None:
    """(origin, T_0, T_mult) of each recorded warm-restart scheduler, or None when none is recorded.

    The origin is the step whose LR is the start of the scheduler's first period: the segment's
    `start_step` minus the scheduler's `last_epoch` at watch time, plus the `SequentialLR`
    milestone it starts at. None when that is unknown (only the periods are then used).

    Example:
        >>> meta = {"start_step": 0, "scheduler": [{"class": "CosineAnnealingWarmRestarts",
        ...         "settings": {"T_0": 10, "T_mult": 2, "last_epoch": 0}}]}
        >>> restart_settings(meta)
        [(0, 10, 2)]
    """
    meta = meta or {}
    start_step = meta.get("start_step") if isinstance(meta.get("start_step"), int) else None
    top = meta.get("scheduler")
    top_epoch = None
    if isinstance(top, list) and top and isinstance(top[0], dict):
        epoch = (top[0].get("settings") or {}).get("last_epoch")
        top_epoch = int(epoch) if isinstance(epoch, (int, float)) else None
    origin = start_step - top_epoch if start_step is not None and top_epoch is not None else None
    found: list[tuple[int | None, int, int]] = []
    for entry, offset in _schedulers(top, 0):
        if entry.get("class") != "CosineAnnealingWarmRestarts":
            continue
        settings = entry.get("settings") or {}
        t0, mult = settings.get("T_0"), settings.get("T_mult", 1)
        if isinstance(t0, int) and t0 >= 1 and isinstance(mult, int) and mult >= 1:
            found.append((origin + offset if origin is not None and offset is not None else None, t0, mult))
    return found or None


def _restart_steps(origin: int, t0: int, mult: int, until: int) -> set[int]:
    """Steps at which a warm-restart schedule that began at `origin` restarts, up to `until`."""
    out, step, period = set(), origin + t0, t0
    while step <= until:
        out.add(step)
        period *= mult
        step += period
    return out


def scheduled_restarts(frame: pd.DataFrame, jumps: list[dict[str, Any]], meta: dict[str, Any] | None,
                       cycle_starts: list[int]) -> set[tuple[int, int]]:  # fmt: skip
    """(step, group) of the `jumps` that are scheduled warm restarts (see the module docstring).

    Args:
        frame: one lineage's step table (`step`, `lr`, `lr_<i>`), in step order.
        jumps: `lr_discontinuities` of that lineage, with `at_resume` set.
        meta: the run's meta.json (its `start_step` and `scheduler` record, if any).
        cycle_starts: steps where a cycle may begin: the lineage's first step and its resumes.

    Example:
        >>> frame = pd.DataFrame({"step": range(6), "lr": [1.0, 0.5, 0.1, 1.0, 0.5, 0.1]})
        >>> jump = {"step": 3, "group": 0, "after": 1.0, "direction": "up", "at_resume": None}
        >>> meta = {"start_step": 0, "scheduler": [{"class": "CosineAnnealingWarmRestarts",
        ...         "settings": {"T_0": 3, "last_epoch": 0}}]}
        >>> scheduled_restarts(frame, [jump], meta, [0]), scheduled_restarts(frame, [jump], None, [0])
        ({(3, 0)}, set())
    """
    settings = restart_settings(meta)
    out: set[tuple[int, int]] = set()
    steps = frame["step"].to_numpy()
    until = int(steps.max()) if steps.size else 0
    for group in sorted({j["group"] for j in jumps}):
        column = "lr" if group == 0 else f"lr_{group}"
        if column not in frame.columns:
            continue
        lr = frame[column].to_numpy(dtype=float)
        candidates = sorted(j["step"] for j in jumps if j["group"] == group and _to_peak(j, steps, lr))
        if settings is None:
            out |= {(s, group) for s in _geometric(candidates, cycle_starts)}
            continue
        predicted = set().union(*(_restart_steps(o, t0, m, until) for o, t0, m in settings if o is not None))
        periods = {t0 * m**k for _, t0, m in settings for k in range(_MAX_PERIODS if m > 1 else 1)}
        out |= {(s, group) for s in candidates if s in predicted}
        # Where the phase is unknown (or a resumed segment began a cycle): a period from the cycle start.
        out |= {(s, group) for s in _on_period([c for c in candidates if c not in predicted], cycle_starts, periods)}
    return out


def _to_peak(jump: dict[str, Any], steps: np.ndarray, lr: np.ndarray) -> bool:
    if jump["direction"] != "up" or jump.get("at_resume") is not None:
        return False
    before = lr[(steps < jump["step"]) & np.isfinite(lr)]
    if before.size == 0:
        return False
    peak = float(before.max())
    return peak > 0 and abs(jump["after"] - peak) <= _PEAK_TOLERANCE * peak


def _on_period(candidates: list[int], starts: list[int], periods: set[int]) -> list[int]:
    """Candidates that end a recorded period, counted from the latest cycle start or accepted restart."""
    accepted: list[int] = []
    for step in sorted(candidates):
        origins = [s for s in starts + accepted if s < step]
        if any(step - origin in periods for origin in origins):
            accepted.append(step)
    return accepted


def _geometric(candidates: list[int], starts: list[int]) -> list[int]:
    """All candidates when there are two or more and their periods grow by one integer factor, else none."""
    if len(candidates) < 2:
        return []
    candidates = sorted(candidates)
    first = max((s for s in starts if s < candidates[0]), default=None)
    points = ([first] if first is not None else []) + candidates
    gaps = np.diff(points)
    if (gaps <= 0).any():
        return []
    ratios = gaps[1:] / gaps[:-1]
    if ratios.size and not (np.all(ratios == ratios[0]) and ratios[0] == int(ratios[0]) and ratios[0] >= 1):
        # The span from the lineage start may hold a warmup: judge the restarts among themselves.
        inner = np.diff(candidates)
        inner_ratios = inner[1:] / inner[:-1]
        if inner_ratios.size and not (np.all(inner_ratios == inner_ratios[0]) and inner_ratios[0] == int(inner_ratios[0])):
            return []
    return candidates


def restarted_at_resume(frame: pd.DataFrame, starts: dict[int, int]) -> list[dict[str, Any]]:
    """Resumes whose LR started the schedule again: from the resume on (or from the step after it, where
    the first resumed step ran at the checkpoint's LR: `_RESTART_LAGS`), the LR retraces the lineage's
    own first steps (to within 1%) while it differs from the LR just before the resume by 20% or more.

    That is the scheduler (or the loop's step counter for a hand-set LR) not restored with the
    checkpoint: a warmup run again, then a decay from the peak the run had left behind. The LR rises
    gradually along the warmup, so the step test of `lr_discontinuities` never sees it.

    Args:
        frame: one lineage's step table (`step`, `lr`, `lr_<i>`), in step order.
        starts: first step -> segment of each resumed piece of the lineage.

    Returns:
        One discontinuity per resume and param group, as `lr_discontinuities` gives them (`step` the
        resume, `before` the LR just before it, `after` the highest LR from it on (the restarted
        warmup's peak: a long warmup climbs for many steps), `direction` up when that is above
        `before` (by more than the 1% the retrace allows), else down and `after` the LR at the
        resume), plus `at_resume`, `retraced` (steps compared), `resumed_lr` (the LR where the restart
        shows: the warmup's first value, below `before`), `restart_step` (that step: the resume, or the
        one after it), and, up only, `peak_step` (where the LR
        reached `after`) and `until` (the last step whose LR is above `before`, the end of the
        stretch the restart ran the LR higher).

    Example:
        >>> lr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.45, 0.4, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
        >>> frame = pd.DataFrame({"step": range(14), "lr": lr})
        >>> [(j["step"], j["direction"], j["resumed_lr"], j["after"], j["peak_step"], j["until"]) for j in restarted_at_resume(frame, {8: 1})]
        [(8, 'up', 0.1, 0.5, 12, 13)]
    """
    out = []
    steps = frame["step"].to_numpy()
    for column in lr_columns(frame):
        lr = frame[column].to_numpy(dtype=float)
        for start, segment in sorted(starts.items()):
            i = int(np.searchsorted(steps, start))
            if i == 0 or i >= len(lr) or steps[i] != start:
                continue
            found = next((j for lag in _RESTART_LAGS if (j := _restart(lr, i, lag)) is not None), None)
            if found is None:
                continue
            r, n = found
            before = _left(lr, i, r - i)
            higher = np.flatnonzero(lr[r:] > (1 + _PEAK_TOLERANCE) * before)
            # Above the LR it left: the restarted schedule runs higher than the run's had got to, and a
            # decaying schedule's own continuation lower still, on every step from there.
            up = higher.size > 0
            after = float(np.nanmax(lr[r:])) if up else float(lr[r])
            peak = {"peak_step": int(steps[r + int(np.nanargmax(lr[r:]))]), "until": int(steps[r + higher[-1]])} if up else {}
            out.append({
                "step": start, "group": 0 if column == "lr" else int(column[3:]), "before": before,
                "after": after, "factor": after / before, "direction": "up" if up else "down",
                "at_resume": segment, "retraced": n, "resumed_lr": float(lr[r]), "restart_step": int(steps[r]), **peak,
            })  # fmt: skip
    return sorted(out, key=lambda j: (j["step"], j["group"]))


def _restart(lr: np.ndarray, i: int, lag: int) -> tuple[int, int] | None:
    """(index where the schedule's start shows again, steps compared) when the LR from `lag` steps after
    the resume at index `i` retraces the lineage's own LR from its step `lag` on, and differs there from
    the LR the run had reached (`_left`) by `_MIN_RESTART_CHANGE` or more; else None."""
    r = i + lag
    n = min(_RETRACE_STEPS, i - lag, len(lr) - r)
    if n < _RETRACE_STEPS:
        return None
    ahead, first, before = lr[r : r + n], lr[lag : lag + n], _left(lr, i, lag)
    if not (np.isfinite(ahead).all() and np.isfinite(first).all() and before > 0):
        return None
    retraced = bool(np.all(np.abs(ahead - first) <= _PEAK_TOLERANCE * np.maximum(np.abs(first), 1e-30)))
    if not retraced or abs(lr[r] - before) < _MIN_RESTART_CHANGE * before:
        return None
    return r, n


def _left(lr: np.ndarray, i: int, lag: int) -> float:
    """The LR the run had reached at the resume at index `i`: where the first resumed step ran at the
    checkpoint's LR (`lag` 1), that step's own LR, read on the resumed side (the rows before a resume
    may stop short of it: a killed job's last unflushed steps); else the LR of the row before."""
    return float(lr[i] if lag > 0 else lr[i - 1])


def restart_path(jump: dict[str, Any]) -> str:
    """The LR's path across a resume that restarted the schedule, as `restarted_at_resume` found it.

    The LR at the resume is the warmup's first value, below the one it left; only later does the
    restarted warmup climb above it. Both are said, so the numbers match the run's LR at each step.

    Example:
        >>> restart_path({"before": 0.5, "resumed_lr": 0.1, "after": 0.6, "factor": 1.2, "direction": "up", "peak_step": 12})
        'fell from 0.5 to 0.1 at the resume, then climbed to 0.6 by step 12 (1.2x the LR it left)'
    """
    where = "at the resume"
    if jump.get("restart_step", jump.get("step")) != jump.get("step"):
        where = f"at step {jump['restart_step']}, the resumed job's second step (its first ran at the checkpoint's LR)"
    path = f"fell from {fmt(jump['before'])} to {fmt(jump['resumed_lr'])} {where}"
    if jump["resumed_lr"] > jump["before"]:
        path = f"went from {fmt(jump['before'])} to {fmt(jump['resumed_lr'])} {where}"
    if jump["direction"] != "up":
        return path
    return f"{path}, then climbed to {fmt(jump['after'])} by step {jump['peak_step']} ({fmt(jump['factor'], 2)}x the LR it left)"
