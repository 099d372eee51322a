"""Incidents at known change points: the weights going back toward their start, an LR jump with too little history, an anomalous batch, an update the gradient does not explain.

The spike detector judges each step against a rolling baseline of the last `window` steps. Early in
a run the loss is still falling fast, so that baseline holds much higher losses and a wide spread:
a loss thrown back from 3.3 to 5.5 (a reset of the weights at step 90 of 120) stays inside the
band. A change point found independently of the loss needs no scan: the parameter norm moving back
most of the way to its start in one step, or an upward LR discontinuity. There one test suffices:
is the loss over the `lr_response_steps` steps from the change above the trajectory the run was on
before it, by `damage_z` of its own autocorrelation-robust standard errors (the damage judgement's
statistic, `trajectory.lasting_excess`)? An anomalous batch (its fingerprint: near-constant tokens,
overlong sequences, a distinct-token ratio far off the run's) is a one-step change: its own loss,
measured before its update, must be the detector's `threshold` of the trajectory's sigmas above it.
An update the gradient does not explain (`state_jumps`: the update norm per unit LR far above its
history at a step whose gradient norm is not) is the optimizer's state changing under the run:
zeroed or rescaled moments, a dropped state.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import LOG10_SIGMA_FLOOR, robust_center_scale
from spikedoc.analysis.batches import BatchProfile, attribute_batches
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.recovery_config import RecoveryConfig
from spikedoc.analysis.trajectory import fit_trajectory, lasting_excess
from spikedoc.detector.streaming import DetectorConfig

__all__ = ["weight_returns", "anomalous_batches", "state_jumps", "trajectory_departures", "trajectory_response",
           "change_point_incidents"]

# The run's parameter norm must have moved this share of itself from its start before a move "back" means anything.
_MOVED = 0.01
# Steps by which an incident found by detection may miss a change point and still be its incident
# (the loss of step t shows the update of step t-1; a bad batch two steps before is a candidate).
_NEAR = 2
# Logged steps before the change that fit the trajectory the response is tested against.
_MIN_BEFORE = 10
# Logged steps of update and gradient history a state jump is judged against (a robust sigma from
# fewer is too rough; Adam's bias-corrected first steps move the update per unit LR on their own).
_MIN_STATE_HISTORY = 20
# Steps that share one trajectory in `trajectory_departures`' first pass (a few steps of extrapolation
# move it by far less than the half bar it screens at).
_BLOCK = 25


def weight_returns(frame: pd.DataFrame, config: AnalysisConfig) -> list[dict[str, Any]]:
    """Steps where the global parameter norm went back at least `state_reset_fraction` of the way to its start in one step.

    Training moves the parameter norm a little each step; only a reset (a re-initialisation, a
    checkpoint never loaded) undoes most of its journey at once. Zeroed or rescaled optimizer moments
    move the weights away from where training took them, never back to the start.

    Returns:
        dicts with `step`, `initial`, `before`, `after`, `share`.

    Example:
        >>> frame = pd.DataFrame({"step": range(6), "param_norm": [10.0, 11.0, 12.0, 13.0, 10.2, 10.3]})
        >>> [(r["step"], round(r["share"], 2)) for r in weight_returns(frame, AnalysisConfig())]
        [(4, 0.93)]
    """
    if "param_norm" not in frame.columns or frame.empty or int(frame["step"].iloc[0]) > 10:
        return []
    norms = frame["param_norm"].to_numpy(np.float64)
    steps = frame["step"].to_numpy()
    ok = np.flatnonzero(np.isfinite(norms))
    if ok.size < 2:
        return []
    initial = float(norms[ok[0]])
    out = []
    for prev, now in zip(ok[:-1], ok[1:]):
        moved = norms[prev] - initial
        if not abs(moved) > _MOVED * abs(norms[prev]):
            continue
        share = float((norms[prev] - norms[now]) / moved)
        if config.state_reset_fraction <= share <= 2 - config.state_reset_fraction:
            out.append({"step": int(steps[now]), "initial": initial, "before": float(norms[prev]),
                        "after": float(norms[now]), "share": share})
    return out


def anomalous_batches(rows: pd.DataFrame, profile: BatchProfile, config: AnalysisConfig) -> list[int]:
    """Steps whose batch has a fingerprint anomaly (`attribute_batches`), among rows with a statistic
    `z_threshold` robust sigmas off the run's (a vectorised first pass: most steps are never described)."""
    off = np.zeros(len(rows), dtype=bool)
    for column, (center, sigma) in profile.stats.items():
        if column in rows.columns and sigma > 0:
            values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
            with np.errstate(invalid="ignore"):
                off |= np.abs(values - center) >= config.z_threshold * sigma
    if not off.any():
        return []
    return sorted({int(b["step"]) for b in attribute_batches(rows.loc[off], profile=profile, config=config) if b["anomalies"]})


def state_jumps(frame: pd.DataFrame, config: AnalysisConfig) -> list[int]:
    """Steps where the update norm per unit LR jumps while the gradient norm does not: its change
    from the step before is `z_threshold` robust sigmas off the run's step-to-step changes, its level
    half that above its last `lookback` steps, and the gradient norm within half of it of its own.

    The update of a healthy optimizer follows its gradient (SGD), or its gradient over the moments
    that the gradient built (Adam); per unit LR, schedule changes drop out. An update that jumps with
    a quiet gradient is the state itself changing: zeroed or rescaled moments, momentum blown up, a
    state dropped. The change from one step to the next is what makes it a jump: the level alone
    drifts early in a run (Adam's update per unit LR falls for tens of steps), and a level test then
    misses a 27x jump, while changes alone are heavy-tailed (one SGD step in a clean run scores 10).
    On the exam's 60 clean calibration runs no step qualifies; of its 17 optimizer-state runs with
    Adam or SGD, the planted step does in 14 (not: two SGD momentum buffers dropped, whose update
    falls, and one Adam state dropped; `bench/exam.py`).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> frame = pd.DataFrame({"step": range(60), "lr": 1e-3, "grad_norm": np.exp(rng.normal(0, 0.1, 60)),
        ...                       "update_norm": 1e-3 * np.exp(rng.normal(0, 0.1, 60))})
        >>> frame.loc[40, "update_norm"] = 0.05
        >>> state_jumps(frame, AnalysisConfig())
        [40]
    """
    if not {"update_norm", "grad_norm", "lr"} <= set(frame.columns) or len(frame) <= _MIN_STATE_HISTORY:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        update = np.log10(frame["update_norm"].to_numpy(np.float64) / frame["lr"].to_numpy(np.float64))
        grad = np.log10(frame["grad_norm"].to_numpy(np.float64))
    update[~np.isfinite(update)] = np.nan
    grad[~np.isfinite(grad)] = np.nan
    change = np.concatenate([[np.nan], np.diff(update)])
    half = config.z_threshold / 2
    candidates = np.flatnonzero(_screen(update, half, config.lookback) & _screen(change, config.z_threshold, config.lookback))
    steps, hits = frame["step"].to_numpy(), []
    for i in candidates:
        lo = max(0, i - config.lookback)
        level, jump, grad_z = (_z_against(series, lo, i) for series in (update, change, grad))
        if level >= half and jump >= config.z_threshold and not grad_z >= half:
            hits.append(int(i))
    return [int(steps[i]) for k, i in enumerate(hits) if k == 0 or hits[k - 1] != i - 1]


def _screen(series: np.ndarray, z: float, window: int) -> np.ndarray:
    """A vectorised first pass: the steps at least half of `z` sigmas above the median of the `window`
    values before them, the sigma from their interquartile range (MAD's sigma on symmetric noise;
    half the bar leaves room where the two differ) and floored as the exact score's is."""
    rolling = pd.Series(series).rolling(window, min_periods=_MIN_STATE_HISTORY)
    median, q1, q3 = (r.shift(1).to_numpy() for r in (rolling.median(), rolling.quantile(0.25), rolling.quantile(0.75)))
    sigma = np.maximum((q3 - q1) / 1.349, LOG10_SIGMA_FLOOR)
    with np.errstate(invalid="ignore"):
        return series - median >= 0.5 * z * sigma


def _z_against(series: np.ndarray, lo: int, i: int) -> float:
    """Robust z of `series[i]` against `series[lo:i]`, the log-scale floor on its sigma."""
    center, sigma = robust_center_scale(series[lo:i])
    return (series[i] - center) / max(sigma, LOG10_SIGMA_FLOOR) if math.isfinite(center) else math.nan


def trajectory_departures(frame: pd.DataFrame, config: AnalysisConfig, detector: DetectorConfig) -> list[int]:
    """Steps where the detector's band holds the loss's own fall and whose loss may depart to the
    detector's `threshold` of sigmas above the trajectory of the steps before it (the step before was
    not already that far out): the candidates of `change_point_incidents`' exact one-step test (a
    first pass: one trajectory per `_BLOCK` steps, half the bar).

    The detector's band is the median and spread of the last `window` losses. While the loss still
    falls fast (its first hundreds of steps, or all of a short run) that spread is the fall itself:
    a batch whose loss is nine times the noise around the trajectory (1.6x the loss) stays inside it.
    The trajectory (`fit_trajectory`, the damage judgement's) follows the fall, so its spread is the
    noise. Only where the trajectory falls across the detector's window by at least half the
    threshold (in its own sigmas) is the detector's band the fall's rather than the noise's; where the
    loss is flat the two estimates differ only by estimator noise, and judging such a step again only
    adds false alarms (70 on the 75 healthy modded-nanogpt logs, to the detector's 905). On the exam's
    120 clean calibration runs no step passes that the detector does not flag already (the largest
    one-step excess of the others is 6.4 sigma), while the planted step of 58 of its faulty runs does,
    the trajectory falling 8-41 sigmas across the window there (`bench/exam.py`).

    Example:
        >>> steps = np.arange(120)
        >>> loss = 3.0 + 2.5 * np.exp(-steps / 25) + 0.05 * np.sin(steps * 1.3)
        >>> loss[70] += 1.0
        >>> trajectory_departures(pd.DataFrame({"step": steps, "loss": loss}), AnalysisConfig(), DetectorConfig())
        [70]
    """
    if "loss" not in frame.columns:
        return []
    recovery = config.recovery or RecoveryConfig()
    steps, losses = frame["step"].to_numpy(), frame["loss"].to_numpy(np.float64)
    finite = np.flatnonzero(np.isfinite(losses))
    bar = detector.threshold / 2
    z = np.full(len(steps), np.nan)  # each step's excess over the trajectory of its block, in its sigmas
    flat_until = 0
    for start in range(0, len(steps), _BLOCK):
        before = finite[: int(np.searchsorted(finite, start))][-recovery.fit_steps :]
        if before.size < _MIN_BEFORE or start < flat_until:
            continue
        t = fit_trajectory(steps[before], losses[before], recovery)
        fall = (t.at(steps[max(0, start - detector.window)]) - t.at(steps[start])) / t.sigma
        if fall < bar:  # the loss is about flat over the detector's window: its band is the noise's
            if fall < bar / 2:  # far from it: looked at again a window later (a long flat run costs few fits)
                flat_until = start + detector.window
            continue
        block = slice(start, min(start + _BLOCK, len(steps)))
        z[block] = (losses[block] - np.array([t.at(s) for s in steps[block]])) / t.sigma
    with np.errstate(invalid="ignore"):
        # A departure: a step already out at the one before it continues that step's departure.
        departs = (z >= bar) & ~(np.concatenate([[np.nan], z[:-1]]) >= detector.threshold)
    return [int(s) for s in steps[departs]]


def trajectory_response(steps: np.ndarray, losses: np.ndarray, at: int, *, span: int,
                        recovery: RecoveryConfig) -> dict[str, Any] | None:  # fmt: skip
    """The loss from step `at` on against the trajectory fitted on the finite losses before it.

    Returns:
        None with fewer than `_MIN_BEFORE` losses before `at` or fewer than `span // 2` in the
        window; else (`span` 1: the step's own excess in the trajectory's sigma) `mean` (mean excess over the `span` steps from `at`), `se` (its Newey-West
        standard error), `z`, `ratio` (mean excess / the trajectory there), `trajectory`.
    """
    finite = np.isfinite(losses)
    before = finite & (steps < at)
    window = (steps >= at) & (steps < at + span)
    if before.sum() < _MIN_BEFORE or (finite & window).sum() < (1 if span == 1 else max(2, span // 2)):
        return None
    t = fit_trajectory(steps[before], losses[before], recovery)
    expected = np.array([t.at(s) for s in steps[window]])
    if span == 1:  # one step: its own excess in the trajectory's per-step sigma, nothing to average
        mean = float(losses[window][0] - expected[0])
        return {"mean": mean, "se": t.sigma, "z": mean / t.sigma, "ratio": mean / float(expected[0]), "trajectory": t}
    residuals = np.where(finite[window], losses[window] - expected, 5 * t.sigma)  # a non-finite loss is as far off as counted
    mean, se = lasting_excess(residuals, t.sigma)
    level = float(expected.mean())
    z = mean / se if se > 0 else math.inf * np.sign(mean)
    return {"mean": mean, "se": se, "z": float(z), "ratio": mean / level if level > 0 else math.nan, "trajectory": t}


def change_point_incidents(frame: pd.DataFrame, points: list[dict[str, Any]], found: list[Incident],
                           config: AnalysisConfig, *, threshold: float = 7.0, merge_gap: int = 3) -> list[Incident]:  # fmt: skip
    """One incident per change point whose loss rose above its pre-change trajectory, where detection found none.

    A one-step change's incident lasts, as a detector episode does, while its loss stays above the bar
    that found it (`threshold` trajectory sigmas, no more than `merge_gap` steps below it in a row): a
    loss back under it at the next step is a one-step spike. A level change's lasts while the loss is
    off the trajectory's tolerance (`RecoveryConfig.tolerance_sigma`, `hold_steps`).

    Args:
        frame: one lineage's step table (`step`, `loss`), in step order.
        points: change points, each with its `step`, `why` (what changed there), `certain` (True: an
            incident even when the loss did not respond), `one_step`
            (True: only that step's own loss is tested, in trajectory sigmas against `threshold`) and
            `until` (a change that lasts to that step: tested over all of it, when longer than the window).
        found: incidents already found; a change point that one of them spans (give or take
            `_NEAR` steps) is already explained.
        config: `lr_response_steps` (the window tested) and the recovery settings (`damage_z`).
        threshold: the one-step test's bar (the detector's `threshold`).
        merge_gap: steps under the bar a one-step change's incident may hold (the detector's `merge_gap`).
    """
    if "loss" not in frame.columns or not points:
        return []
    recovery = config.recovery or RecoveryConfig()
    span = config.lr_response_steps
    steps, losses = frame["step"].to_numpy(), frame["loss"].to_numpy(np.float64)
    out: list[Incident] = []
    for point in sorted(points, key=lambda p: p["step"]):
        at = point["step"]
        if any(i.onset_step - _NEAR <= at <= i.end_step + _NEAR for i in [*found, *out]):
            continue  # an incident already spans the change
        one = point.get("one_step", False)
        # A change that lasts (a restarted schedule, `until` its last step of higher LR) is tested over all of it.
        longer = point["until"] - at + 1 if point.get("until") is not None else 0
        width = 1 if one else max(span, longer)
        if point.get("certain"):  # not tested: the trajectory only, on whatever steps the run has left
            width = max(1, min(width, int(np.count_nonzero(steps >= at))))
        test = trajectory_response(steps, losses, at, span=width, recovery=recovery)
        # A change known for certain (`certain`: a moment beyond its optimizer's exact bound) is an
        # incident whatever the loss did next: its damage can come slowly, and the recovery judgement sizes it.
        if test is None or not (point.get("certain") or test["z"] >= (threshold if one else recovery.damage_z)):
            continue
        band, gap = (threshold, merge_gap + 1) if one else (recovery.tolerance_sigma, recovery.hold_steps)
        kind = "state_write" if point.get("certain") else "loss_spike"
        out.append(_incident(steps, losses, at, test, point["why"], band_sigma=band, max_gap=gap, kind=kind))
    return out


def _incident(steps: np.ndarray, losses: np.ndarray, at: int, test: dict[str, Any], why: str, *,
              band_sigma: float, max_gap: int, kind: str = "loss_spike") -> Incident:  # fmt: skip
    # The loss is out while `band_sigma` trajectory sigmas above it; the incident holds across at most `max_gap` steps in.
    t = test["trajectory"]
    after = np.flatnonzero(steps >= at)
    expected = np.array([t.at(s) for s in steps[after]])
    excess = np.where(np.isfinite(losses[after]), losses[after] - expected, math.inf)
    off = np.flatnonzero(excess > band_sigma * t.sigma)
    # Out of the band from the change on: the incident ends at the last such step before a longer
    # stretch inside it (the recovery judgement then decides what is left).
    end = at
    for i in off:
        if steps[after[i]] - end > max_gap:
            break
        end = int(steps[after[i]])
    span = after[steps[after] <= end]
    values = losses[span]
    peak = int(span[np.argmax(np.where(np.isfinite(values), values, np.inf))]) if values.size else int(after[0])
    base = float(t.at(at))
    recovered = end < int(steps[-1])
    nxt = steps[after][steps[after] > end]
    series = {
        "onset_step": int(at), "peak_step": int(steps[peak]), "end_step": end,
        "magnitude_sigma": float((losses[peak] - base) / t.sigma) if math.isfinite(losses[peak]) else math.inf,
        "peak_ratio": float(losses[peak] / base) if base > 0 else math.nan, "baseline": base,
        "peak_value": float(losses[peak]), "recovered": bool(recovered),
        "recovery_step": int(nxt[0]) if recovered and nxt.size else None, "low_confidence": False,
        "persistent": not recovered, "shift_z": test["z"], "shift_ratio": test["ratio"], "change": why,
    }  # fmt: skip
    return Incident(kind=kind, metric="loss", onset_step=int(at),
                    peak_step=series["peak_step"], end_step=end, magnitude_sigma=series["magnitude_sigma"],
                    peak_ratio=series["peak_ratio"], baseline=base, peak_value=series["peak_value"],
                    recovered=bool(recovered), recovery_step=series["recovery_step"], series={"loss": series})
