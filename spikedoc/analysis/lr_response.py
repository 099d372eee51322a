"""The loss and grad-norm response to an upward LR jump: a level test at a known change point.

The spike detector scans every step, so it needs a high threshold (7 sigma) to keep false alarms
rare over a long run. An upward discontinuity of the LR series is different: it is one known
moment, found independently of the loss, and a known cause of instability. There a single test of
"did the level rise?" can afford a lower bar, and a level (the mean over a window) catches the
broad, moderate rise an LR jump typically causes, which no single step may show at 7 sigma.

The test: z-scores of the detector (each step against its rolling baseline) are averaged over the
`lr_response_steps` steps from the jump on; that mean is compared with the same statistic over
every earlier window of the run, in robust sigmas. The run's own windows calibrate it, so
autocorrelated or heavy-tailed noise raises the bar by itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import robust_center_scale
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.detect import DetectorConfig, flag_series
from spikedoc.analysis.incident import Incident

__all__ = ["lr_jump_incidents", "untested_jumps", "window_level", "level_sigma"]


def lr_jump_incidents(
    frame: pd.DataFrame,
    jumps: list[dict[str, Any]],
    found: list[Incident],
    detector: DetectorConfig,
    config: AnalysisConfig,
) -> list[Incident]:
    """Incidents of upward LR jumps whose loss or grad-norm level rose, that detection did not find.

    The history is the warm windows (`detector.min_history` values in the baseline) before the
    jump; fewer than `detector.min_history` of them and the jump is not tested.

    Args:
        frame: one lineage's step table (`step`, `loss`, optionally `grad_norm`), in step order.
        jumps: `lr_discontinuities` of that lineage.
        found: the detector's incidents on it; a jump followed within `lr_response_steps` by one
            of them is already explained and is not tested.
        detector: the detector's settings (its baseline gives the per-step z-scores).
        config: `lr_response_steps` (window length) and `lr_response_sigma` (threshold).

    Returns:
        One incident per responding jump: onset at the jump, `series[...]["level_sigma"]` holding
        the test's statistic for each series that rose.
    """
    span = config.lr_response_steps
    candidates = [
        j for j in jumps
        if j["direction"] == "up" and not any(j["step"] - span <= i.onset_step <= j["step"] + span for i in found)
    ]
    if not candidates:
        return []
    steps = frame["step"].to_numpy()
    levels = {name: window_level(steps, frame[name].to_numpy(np.float64), span, detector,
                                 log_scale=name == "grad_norm" and detector.grad_norm_log_scale)
              for name in ("loss", "grad_norm") if name in frame.columns}
    out = []
    for jump in sorted({j["step"]: j for j in candidates}.values(), key=lambda j: j["step"]):
        at = int(np.searchsorted(steps, jump["step"]))
        series = {name: ep for name, level in levels.items()
                  if (ep := _response(level, at, span, detector.min_history, config.lr_response_sigma)) is not None}
        if series:
            out.append(_incident(series))
    return out


def untested_jumps(frame: pd.DataFrame, jumps: list[dict[str, Any]], detector: DetectorConfig,
                   config: AnalysisConfig) -> list[dict[str, Any]]:  # fmt: skip
    """The upward jumps `lr_jump_incidents` cannot test: fewer than `detector.min_history` warm loss
    windows before them (early in a run, or a short one), and every schedule restarted at a resume
    (`retraced`): its LR falls to the warmup's start and climbs back over the warmup, so the window
    from the resume holds low-LR steps first and the rise comes late and gradual, which the mean
    of per-step z-scores against a rolling baseline (that follows the rise) dilutes away."""
    ups = [j for j in jumps if j["direction"] == "up"]
    if not ups or "loss" not in frame.columns:
        return []
    steps = frame["step"].to_numpy()
    level = window_level(steps, frame["loss"].to_numpy(np.float64), config.lr_response_steps, detector, log_scale=False)
    return [j for j in ups if j.get("retraced") or _history(level, int(np.searchsorted(steps, j["step"])),
                                                            config.lr_response_steps, detector.min_history) is None]


def window_level(steps: np.ndarray, values: np.ndarray, span: int, detector: DetectorConfig, *, log_scale: bool) -> pd.DataFrame:
    """Per step: the detector's flags plus `level`, the mean z over the `span` steps from there on.

    A window needs half its steps judged (finite z) to have a level; a non-finite step has none.
    """
    flags = flag_series(steps, values, detector, log_scale=log_scale)
    z = flags["z"].where(np.isfinite(flags["z"]))
    level = flags.assign(level=_mean_ahead(z, span))
    level.attrs["log_scale"] = log_scale
    return level


def level_sigma(level: pd.DataFrame, at: int, span: int, min_history: int) -> np.ndarray | None:
    """From row `at` on, the window levels in robust sigmas of the warm windows that ended before it.

    None when fewer than `min_history` such windows exist (or they have no spread).
    """
    history = _history(level, at, span, min_history)
    if history is None:
        return None
    center, sigma = history
    return (level["level"].to_numpy()[at:] - center) / sigma


def _mean_ahead(z: pd.Series, span: int) -> np.ndarray:
    # Mean of z over [i, i + span), with at least half of it present.
    return z[::-1].rolling(span, min_periods=max(1, span // 2)).mean()[::-1].to_numpy()


def _history(level: pd.DataFrame, at: int, span: int, min_history: int) -> tuple[float, float] | None:
    if at >= len(level) or not math.isfinite(level["level"].iloc[at]):
        return None
    before = max(0, at - span + 1)
    history = level["level"].to_numpy()[:before][level["warm"].to_numpy()[:before]]
    history = history[np.isfinite(history)]
    if history.size < min_history:
        return None
    center, sigma = robust_center_scale(history)
    return (center, sigma) if sigma > 0 else None


def _response(level: pd.DataFrame, at: int, span: int, min_history: int, threshold: float) -> dict[str, Any] | None:
    # The series' episode when its level from the jump on is out of the band, else None.
    history = _history(level, at, span, min_history)
    if history is None or not (level["level"].iloc[at] - history[0]) / history[1] >= threshold:
        return None
    # How long it stays up is judged against the level before the jump, held: the rolling baseline
    # would absorb a lasting rise and call it over.
    work = np.log if level.attrs["log_scale"] else np.asarray
    with np.errstate(divide="ignore", invalid="ignore"):
        held = (work(level["value"].to_numpy()[at:]) - work(level["baseline"].iloc[at])) / level["scale"].iloc[at]
    score = (_mean_ahead(pd.Series(np.where(np.isfinite(held), held, np.nan)), span) - history[0]) / history[1]
    below = np.flatnonzero(~(score >= threshold))
    last_window = at + (int(below[0]) - 1 if below.size else len(score) - 1)
    end = min(last_window + span - 1, len(level) - 1)
    stretch = level.iloc[at : end + 1]
    peak = int(stretch["value"].to_numpy().argmax())
    base = float(stretch["baseline"].iloc[0])
    recovered = end + 1 < len(level) and below.size > 0
    return {
        "onset_step": int(stretch["step"].iloc[0]),
        "peak_step": int(stretch["step"].iloc[peak]),
        "end_step": int(stretch["step"].iloc[-1]),
        "magnitude_sigma": float(stretch["z"].iloc[peak]),
        "peak_ratio": float(stretch["value"].iloc[peak] / base) if base else math.nan,
        "baseline": base,
        "peak_value": float(stretch["value"].iloc[peak]),
        "recovered": bool(recovered),
        "recovery_step": int(level["step"].iloc[end + 1]) if recovered else None,
        "low_confidence": False,
        "persistent": not recovered,
        "level_sigma": float((level["level"].iloc[at] - history[0]) / history[1]),
    }


def _incident(series: dict[str, dict[str, Any]]) -> Incident:
    first = series.get("loss") or series["grad_norm"]
    metric = "loss" if "loss" in series else "grad_norm"
    return Incident(
        kind="grad_spike" if metric == "grad_norm" else "divergence" if first["persistent"] else "loss_spike",
        metric=metric,
        onset_step=first["onset_step"],
        peak_step=first["peak_step"],
        end_step=max(s["end_step"] for s in series.values()),
        magnitude_sigma=first["magnitude_sigma"],
        peak_ratio=first["peak_ratio"],
        baseline=first["baseline"],
        peak_value=first["peak_value"],
        recovered=all(s["recovered"] for s in series.values()),
        recovery_step=max(s["recovery_step"] for s in series.values()) if all(s["recovered"] for s in series.values()) else None,
        also_flagged=sorted(name for name in series if name != metric),
        series=dict(sorted(series.items())),
    )
