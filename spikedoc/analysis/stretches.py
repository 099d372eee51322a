"""Stretches of bad data: consecutive steps whose loss sits above the steps around them while their batches look unusual together.

A batch with 30% of its bytes replaced (noisy labels) has a loss well above its neighbours' and a
distinct-token ratio a little above the run's: 2-5 of the ratio's robust sigmas, under the one-batch
bar (`AnalysisConfig.distinct_z`, with a 1.5x ratio). Over a stretch of such batches neither the
detector nor the trajectory's one-step test sees it in a short, fast-falling run: the detector's
band holds the loss's own fall, and a log-line trajectory fitted through a warmup's knee takes the
knee's misfit for noise (its sigma three times the step-to-step noise).

Two pieces of evidence, each measured where it is reliable, make the finding:

- the loss: the stretch's mean excess over a quadratic through the `_FLANK` steps on each side of
  it (which follows a warmup's knee and a fall's bend), in standard errors from the step-to-step
  noise of those flanks (first differences, blind to the trend); it must reach the detector's
  `threshold` (7), the bar of any one-step spike;
- the batches: their distinct-token ratios' z-scores against the run's, combined over the stretch as
  `sum(z) / sqrt(n)` (Stouffer's z, a standard normal for the run's own kind of batch), at least
  `AnalysisConfig.stretch_batch_z`: a confirming test of the steps the loss already singled out.

The loss is measured before the update, so a stretch whose loss falls back at once onto the line of
the steps before it was the batches' own, not the model's: their steps are the ones to skip.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import MAD_TO_SIGMA
from spikedoc.analysis.batches import BatchProfile
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.incident import Incident

__all__ = ["flank_excess", "bad_data_stretches", "stretch_incidents"]

#: Steps on each side of a stretch that its reference is fitted on (a quadratic needs a few; 10 give
#: its noise from 18 first differences).
_FLANK = 10
#: Longest stretch judged: longer departures are level changes, which the damage judgement handles.
_LONGEST = 20
#: Smallest per-step noise believed, as a fraction of the loss (the detector's `scale_floor`).
_SIGMA_FLOOR = 1e-3
#: The loss must jump into a stretch at its first step and out of it after its last by this many
#: standard deviations of a step-to-step difference (the recovery judgement's tolerance, 2): bad data
#: is high from its first batch to its last (the loss is measured before the update), so the steps
#: named to skip are those whose batches were high, not a healthy neighbour the reference sits under.
_EDGE_SIGMAS = 2.0


def flank_excess(losses: np.ndarray, first: int, last: int, *, flank: int = _FLANK) -> dict[str, Any] | None:
    """The mean excess of `losses[first:last + 1]` over a quadratic fitted (least squares) to the
    `flank` values on each side, in its standard error.

    The per-step sigma is the flanks' noise (MAD of their first differences / sqrt 2: a smooth trend
    adds almost nothing to a difference) or the quadratic's misfit of them (the residuals' MAD sigma:
    a bend it cannot follow, a change inside a flank; one blip moves neither), whichever is larger; the standard
    error is that of the stretch's mean plus that of the quadratic's mean over the stretch
    (`sigma^2 * x' (X'X)^-1 x`).

    Returns:
        None when a flank is short or not finite; else `z`, `mean` (excess), `sigma` (per step),
        `noise` (the flanks' step-to-step part of it), `excess` (per step of the stretch) and
        `reference` (the quadratic there).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> loss = 3.0 - 0.01 * np.arange(60) + rng.normal(0, 0.05, 60)
        >>> loss[30:34] += 0.5
        >>> flank_excess(loss, 30, 33)["z"] > 7, abs(flank_excess(loss, 40, 43)["z"]) < 3
        (True, True)
    """
    if first < flank or last + flank >= len(losses):
        return None
    before, after = losses[first - flank : first], losses[last + 1 : last + 1 + flank]
    stretch = losses[first : last + 1]
    if not (np.isfinite(before).all() and np.isfinite(after).all() and np.isfinite(stretch).all()):
        return None
    # Positions centred and scaled to [-1, 1] over the fitted span: a well-conditioned quadratic.
    center, half = (first + last) / 2, (last - first) / 2 + flank
    x = (np.concatenate([np.arange(first - flank, first), np.arange(last + 1, last + 1 + flank)]) - center) / half
    xs = (np.arange(first, last + 1) - center) / half
    design, at = np.vander(x, 3, increasing=True), np.vander(xs, 3, increasing=True)
    inverse = np.linalg.inv(design.T @ design)
    flanks = np.concatenate([before, after])
    coef = inverse @ design.T @ flanks
    reference = at @ coef
    # The noise, or the quadratic's misfit of the flanks (a bend it cannot follow), whichever is larger.
    diffs = np.concatenate([np.diff(before), np.diff(after)])
    noise = MAD_TO_SIGMA * float(np.median(np.abs(diffs - np.median(diffs)))) / math.sqrt(2)
    residuals = flanks - design @ coef
    misfit = MAD_TO_SIGMA * float(np.median(np.abs(residuals - np.median(residuals))))
    sigma = max(noise, misfit, _SIGMA_FLOOR * abs(float(np.median(before))), 1e-12)
    mean_at = at.mean(axis=0)
    se = sigma * math.sqrt(1 / stretch.size + float(mean_at @ inverse @ mean_at))
    excess = stretch - reference
    return {"z": float(excess.mean() / se), "mean": float(excess.mean()), "sigma": sigma, "noise": noise,
            "excess": excess, "reference": reference}  # fmt: skip


def _batch_z(rows: pd.DataFrame, profile: BatchProfile) -> np.ndarray | None:
    """Per step, the batch's distinct-token ratio in robust sigmas from the run's (NaN where not recorded)."""
    stat = profile.stats.get("distinct_token_ratio")
    if stat is None or not stat[1] > 0 or "distinct_token_ratio" not in rows.columns:
        return None
    values = pd.to_numeric(rows["distinct_token_ratio"], errors="coerce").to_numpy(np.float64)
    return (values - stat[0]) / stat[1]


def bad_data_stretches(frame: pd.DataFrame, profile: BatchProfile, config: AnalysisConfig, *,
                       threshold: float) -> list[dict[str, Any]]:  # fmt: skip
    """Stretches of 1 to `_LONGEST` consecutive steps whose batches' distinct-token ratios are together
    `stretch_batch_z` above the run's and whose loss is `threshold` standard errors above the steps
    around them (`flank_excess`), jumping into it at its first step and out after its last; of
    overlapping ones, the strongest in both together.

    Args:
        frame: one lineage's step table of one rank (`step`, `loss`, `distinct_token_ratio`), in step order.
        profile: the run's batch statistics (`batches.batch_profile`).
        config: `stretch_batch_z`.
        threshold: the loss's bar (the detector's `threshold`).

    Returns:
        dicts with `first`, `last` (steps), `z` (the loss's), `batch_z` (Stouffer's), `excess`, `sigma`.
    """
    if "loss" not in frame.columns or len(frame) < 2 * _FLANK + 1:
        return []
    z = _batch_z(frame, profile)
    if z is None:
        return []
    steps, losses = frame["step"].to_numpy(), frame["loss"].to_numpy(np.float64)
    # Stouffer's z of every stretch at once, from running sums (a stretch with an unrecorded ratio: NaN).
    total = np.concatenate([[0.0], np.cumsum(z)])
    found = []
    for length in range(1, _LONGEST + 1):
        combined = (total[length:] - total[:-length]) / math.sqrt(length)
        with np.errstate(invalid="ignore"):
            starts = np.flatnonzero(combined >= config.stretch_batch_z)
        for first in starts:
            last = first + length - 1
            # Consecutive steps only: a hole in the step table is not a stretch.
            if steps[last] - steps[first] != length - 1:
                continue
            test = flank_excess(losses, int(first), int(last))
            if test is not None and test["z"] >= threshold and _sharp_edges(losses, int(first), int(last), test["noise"]):
                found.append({"first": int(steps[first]), "last": int(steps[last]), "z": test["z"],
                              "batch_z": float(combined[first]), "excess": test["excess"], "sigma": test["sigma"]})  # fmt: skip
    # Overlapping candidates (a stretch and its sub-stretches): the one whose loss and batches together
    # stand out most, by Stouffer's sum of the two z-scores (each standard normal for healthy steps).
    chosen: list[dict[str, Any]] = []
    for s in sorted(found, key=lambda s: -(s["z"] + s["batch_z"])):
        if all(s["last"] < c["first"] or s["first"] > c["last"] for c in chosen):
            chosen.append(s)
    return sorted(chosen, key=lambda s: s["first"])


def _sharp_edges(losses: np.ndarray, first: int, last: int, noise: float) -> bool:
    """The loss jumps up into the stretch at `first` and down out of it after `last` (`_EDGE_SIGMAS`)."""
    bar = _EDGE_SIGMAS * math.sqrt(2) * noise
    return bool(losses[first] - losses[first - 1] >= bar and losses[last] - losses[last + 1] >= bar)


def stretch_incidents(frame: pd.DataFrame, profile: BatchProfile, found: list[Incident], config: AnalysisConfig, *,
                      threshold: float) -> list[Incident]:  # fmt: skip
    """One incident per `bad_data_stretches` stretch whose flanks no incident of `found` touches: onset at
    its first step, end at its last, `series["loss"]["stretch"]` the evidence (`steps`, `z`, `batch_z`).

    A loss incident of `found` with its onset inside a stretch (the detector or a one-step test saw its
    first step) is that stretch's: it gets the evidence in its own `series["loss"]["stretch"]`, and
    lasts at least to the stretch's last step.
    """
    out = []
    steps = frame["step"].to_numpy()
    for s in bad_data_stretches(frame, profile, config, threshold=threshold):
        evidence = {"steps": list(range(s["first"], s["last"] + 1)), "z": s["z"], "batch_z": s["batch_z"]}
        inside = [i for i in found if s["first"] <= i.onset_step <= s["last"] and "loss" in i.series]
        # The flanks clear of any other incident: a flank holding another change is no reference.
        if any(i.onset_step <= s["last"] + _FLANK and s["first"] - _FLANK <= i.end_step for i in found if i not in inside):
            continue
        if inside:  # one stretch, one incident: it lasts as long as the stretch's high loss
            inc = inside[0]
            inc.series["loss"]["stretch"] = evidence
            inc.end_step = inc.series["loss"]["end_step"] = max(inc.end_step, s["last"])
            continue
        losses = frame["loss"].to_numpy(np.float64)[(steps >= s["first"]) & (steps <= s["last"])]
        peak = int(np.argmax(s["excess"]))
        base = float(losses[peak] - s["excess"][peak])
        nxt = steps[steps > s["last"]]
        series = {
            "onset_step": s["first"], "peak_step": s["first"] + peak, "end_step": s["last"],
            "magnitude_sigma": float(s["excess"][peak] / s["sigma"]), "peak_ratio": float(losses[peak] / base),
            "baseline": base, "peak_value": float(losses[peak]), "recovered": True,
            "recovery_step": int(nxt[0]) if nxt.size else None, "low_confidence": False, "persistent": False,
            "shift_z": s["z"], "change": "batch stretch", "stretch": evidence,
        }  # fmt: skip
        out.append(Incident(kind="loss_spike", metric="loss", onset_step=s["first"], peak_step=series["peak_step"],
                            end_step=s["last"], magnitude_sigma=series["magnitude_sigma"], peak_ratio=series["peak_ratio"],
                            baseline=base, peak_value=series["peak_value"], recovered=True,
                            recovery_step=series["recovery_step"], series={"loss": series}))  # fmt: skip
    return out
