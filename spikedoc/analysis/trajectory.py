"""The pre-incident trajectory: where a healthy loss was heading, and how sure that is.

A robust straight line in log(step + 1) through the healthy steps before an incident (loss curves
fall roughly as a power of the step, so a line in log-step follows them and flattens as it is
extrapolated), the spread of the healthy steps around it, a lasting shift's mean and standard error
(`lasting_excess`), and how far the method missed on the run's own history (`backtest`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spikedoc.analysis._robust import MAD_TO_SIGMA
from spikedoc.analysis.recovery_config import RecoveryConfig

__all__ = ["Trajectory", "backtest", "fit_trajectory", "lasting_excess"]


@dataclass(frozen=True)
class Trajectory:
    """loss(step) ~ intercept + slope * log(step + 1), and the spread of the healthy steps around it."""

    intercept: float
    slope: float
    """Never positive: a loss is not expected to rise, so a rising history cannot excuse a rise."""
    sigma: float
    """Robust sigma (MAD) of the healthy steps' residuals, floored at 0.1% of the level."""
    fit_steps: int
    """Healthy steps the fit used (0: too few, a flat line at their median)."""

    anchor: float = 0.0
    """log(step + 1) of the last healthy step: the extrapolation starts there."""
    slope_share: float = 1.0
    level_se: float = math.nan
    """Error of the line's level at the anchor: the standard error of the healthy residuals' mean
    (autocorrelation-robust, `lasting_excess`), or the line's miss at its own end (the median residual
    of its last `hold_steps` // 2 points), whichever is larger."""

    def at(self, step: float) -> float:
        """The loss the healthy run was heading for at `step`."""
        x = math.log(step + 1.0)
        if x <= self.anchor:
            return self.intercept + self.slope * x
        return self.intercept + self.slope * (self.anchor + self.slope_share * (x - self.anchor))


# Smallest sigma believed, as a fraction of the level (the detector's scale_floor).
_SIGMA_FLOOR = 1e-3


def fit_trajectory(steps: Sequence[int] | np.ndarray, losses: Sequence[float] | np.ndarray, config: RecoveryConfig | None = None) -> Trajectory:
    """Robust (Theil-Sen) line of the loss in log(step + 1) through the last `fit_steps` finite points.

    Args:
        steps: healthy steps before onset, oldest first.
        losses: their losses.
        config: `fit_steps`, `min_fit_steps`.

    Example:
        >>> steps = list(range(100, 200))
        >>> t = fit_trajectory(steps, [5.0 - 0.5 * math.log(s + 1) for s in steps])
        >>> round(t.at(150), 3) == round(5.0 - 0.5 * math.log(151), 3)   # on the fitted stretch
        True
        >>> t.at(300) > 5.0 - 0.5 * math.log(301)   # beyond it, at half the slope: curves flatten
        True
    """
    config = config or RecoveryConfig()
    x = np.log(np.asarray(steps, dtype=np.float64) + 1.0)
    y = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep][-config.fit_steps :], y[keep][-config.fit_steps :]
    if y.size == 0:
        return Trajectory(math.nan, 0.0, math.nan, 0)
    if y.size < config.min_fit_steps:
        level = float(np.median(y))
        return Trajectory(level, 0.0, _robust_sigma(y - level, level), 0)
    i, j = np.triu_indices(x.size, k=1)
    dx = x[j] - x[i]
    ok = dx > 0
    slope = min(0.0, float(np.median((y[j] - y[i])[ok] / dx[ok]))) if ok.any() else 0.0
    intercept = float(np.median(y - slope * x))
    level = intercept + slope * float(x[-1])
    residuals = y - (intercept + slope * x)
    sigma = _robust_sigma(residuals, level)
    # The level's error: its standard error over the fit, or how far the line misses its own last
    # half `hold_steps` points (a curve bending away from a straight line), whichever is larger.
    end_miss = abs(float(np.median(residuals[-max(1, config.hold_steps // 2):])))
    return Trajectory(intercept, slope, sigma, int(y.size), float(x[-1]), config.slope_share,
                      max(lasting_excess(residuals, sigma)[1], end_miss))


def _robust_sigma(residuals: np.ndarray, level: float) -> float:
    mad = float(np.median(np.abs(residuals - np.median(residuals))))
    return max(MAD_TO_SIGMA * mad, _SIGMA_FLOOR * abs(level), 1e-12)


def lasting_excess(residuals: Sequence[float] | np.ndarray, sigma: float) -> tuple[float, float]:
    """Mean of `residuals` (loss minus trajectory) and its standard error, robust to autocorrelation.

    Consecutive losses of one run are correlated (the same weights, a slowly moving trajectory
    misfit), so the i.i.d. error sigma / sqrt(n) would be too small; the Newey-West (1987)
    estimator with a Bartlett kernel and Newey-West (1994)'s lag floor(4 (n/100)^(2/9)) sums the
    autocovariances. Residuals are first clipped at 5 `sigma` (the per-step robust sigma), so that
    one data blip after the recovery cannot make or hide a shift.

    Example:
        >>> mean, se = lasting_excess([0.1] * 50 + [0.0] * 50, 0.05)
        >>> round(mean, 3), se > 0
        (0.05, True)
    """
    r = np.clip(np.asarray(residuals, dtype=np.float64), -5 * sigma, 5 * sigma)
    n = r.size
    if n < 2:
        return (float(r.mean()) if n else math.nan), math.inf
    d = r - r.mean()
    lags = min(n - 1, int(4 * (n / 100) ** (2 / 9)))
    var = float(d @ d) / n
    for k in range(1, lags + 1):
        var += 2 * (1 - k / (lags + 1)) * float(d[k:] @ d[:-k]) / n
    return float(r.mean()), math.sqrt(max(var, 0.0) / n)


def backtest(steps: Sequence[int] | np.ndarray, losses: Sequence[float] | np.ndarray, config: RecoveryConfig) -> float:
    """How far the trajectory method missed on this run's own healthy history: fitted on all but the
    last third of it (at most `damage_steps`), the mean excess of that last third over the fit, as a
    share of the fit (absolute; 0 when the history is too short to try)."""
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep][-config.fit_steps - config.damage_steps:], y[keep][-config.fit_steps - config.damage_steps:]
    h = min(config.damage_steps, y.size // 3)
    if y.size - h < config.min_fit_steps or h < 2:
        return 0.0
    t = fit_trajectory(x[:-h], y[:-h], config)
    expected = np.array([t.at(s) for s in x[-h:]])
    level = float(expected.mean())
    return abs(float((y[-h:] - expected).mean()) / level) if level > 0 else 0.0
