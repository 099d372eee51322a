"""Recovery and lasting damage: is the loss back on the trajectory it was on before an incident?

The spike detector's band (7 robust sigmas) is built to flag a spike, not to certify a recovery: a
loss can fall back inside it and still stay well above where the healthy run was heading. This
module judges recovery against the pre-incident trajectory instead: the trend of the healthy
steps before onset, extrapolated, with a tolerance in the series' own robust sigma or in the
trajectory's own uncertainty, held for a stretch of steps; then a lasting shift tested against its
standard error, the trajectory's extrapolation uncertainty included. One implementation (`RecoveryTracker.update`) serves the offline judgement of
`analyze` (`judge_recovery`) and the online one of the guard, so both agree by construction.

The trajectory is a robust straight line in log(step + 1): loss curves fall roughly as a power of
the step, so over a few hundred steps a line in log-step follows them and, unlike a line in the
step itself, flattens as it is extrapolated (docs/detection.md, "Recovery and damage", has the
measurements behind every default).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spikedoc.analysis.recovery_config import RecoveryConfig
from spikedoc.analysis.trajectory import Trajectory, backtest, fit_trajectory, lasting_excess

__all__ = ["VERDICTS", "RecoveryConfig", "Trajectory", "RecoveryState", "RecoveryTracker", "fit_trajectory", "judge_recovery",
           "lasting_excess"]

#: Final verdicts on an incident's aftermath, from harmless to worst.
VERDICTS = ("recovered", "recovered_with_damage", "persistent", "divergence")

_STATE_FORMAT = 3
# Share of the backtest's miss counted in the trajectory's uncertainty: the backtest extrapolates from an
# earlier, steeper stretch of the curve than the one after onset, so its whole miss overstates the error there.
_BACKTEST_SHARE = 0.5
# Standard deviation of the progress the trajectory expects, as a share of it: the realised share of
# the local slope taken as anywhere from none to twice `slope_share` (a uniform spread,
# sd = 1/sqrt(3)); docs/detection.md has what a narrower spread does.
_PROGRESS_SD = 3**-0.5


@dataclass(frozen=True)
class RecoveryState:
    """The judgement after one more step of an incident's aftermath."""

    step: int
    verdict: str
    """`pending` while undecided, else one of VERDICTS."""
    decided: bool
    """Final enough to act on: back on the trajectory for `hold_steps`, non-finite for
    `nonfinite_steps`, or `patience_steps` after onset."""
    excess_ratio: float
    """Median loss over the last `hold_steps` / the trajectory there, minus 1 (nan before any)."""
    excess_sigma: float
    """That median excess in the trajectory's sigma (inf when non-finite)."""
    back_step: int | None
    """First step of the first stretch back on the trajectory, if any."""
    shift_ratio: float = math.nan
    """Mean excess since `back_step` (up to `damage_steps` steps) / the trajectory there (nan before)."""
    shift_z: float = math.nan
    """That mean excess in its own autocorrelation-robust standard errors (`lasting_excess`)."""


class RecoveryTracker:
    """Follows one incident's aftermath step by step against the pre-incident trajectory.

    Example:
        >>> history = list(range(0, 150))
        >>> tracker = RecoveryTracker(150, history, [3.0] * 150)
        >>> states = [tracker.update(s, 6.0 if s == 150 else 3.0) for s in range(150, 200)]
        >>> states[-1].verdict, states[-1].back_step
        ('recovered', 151)
    """

    def __init__(
        self,
        onset_step: int,
        history_steps: Sequence[int] | np.ndarray,
        history_losses: Sequence[float] | np.ndarray,
        *,
        config: RecoveryConfig | None = None,
    ) -> None:
        self.config = config or RecoveryConfig()
        self.onset_step = int(onset_step)
        self.trajectory = fit_trajectory(history_steps, history_losses, self.config)
        self.backtest_error = backtest(history_steps, history_losses, self.config)
        self._recent: deque[float] = deque(maxlen=self.config.hold_steps)
        self._recent_steps: deque[int] = deque(maxlen=self.config.hold_steps)
        self._nonfinite_run = 0
        self._back_step: int | None = None
        self._peak_excess = -math.inf
        self._last: RecoveryState | None = None
        # Residuals and expected losses from the first step back on: the lasting shift is tested on them.
        self._since_back: deque[tuple[float, float]] = deque(maxlen=self.config.damage_steps)

    @property
    def usable(self) -> bool:
        """A trajectory could be fitted (some finite history before onset)."""
        return math.isfinite(self.trajectory.intercept)

    def update(self, step: int, loss: float) -> RecoveryState:
        """Judge the aftermath after `step`'s loss (call for every step from onset on)."""
        cfg, t = self.config, self.trajectory
        step, loss = int(step), float(loss)
        if not math.isfinite(loss):
            self._nonfinite_run += 1
            self._recent.clear()
            self._recent_steps.clear()
            diverged = self._nonfinite_run >= cfg.nonfinite_steps
            state = RecoveryState(step, "divergence" if diverged else "pending", diverged, math.inf, math.inf, self._back_step)
            self._last = state
            return state
        self._nonfinite_run = 0
        expected = t.at(step)
        self._recent.append(loss - expected)
        self._recent_steps.append(step)
        excess = float(np.median(self._recent))
        ratio = excess / expected if expected > 0 else math.nan
        sigmas = excess / t.sigma
        full = len(self._recent) == cfg.hold_steps
        if full:
            self._peak_excess = max(self._peak_excess, sigmas)
        limit = self.tolerance(step)
        on_track = full and excess <= limit
        if on_track and self._back_step is None:
            # The stretch's first step that is itself within the tolerance (the stretch may hold the spike).
            self._back_step = next((s for s, r in zip(self._recent_steps, self._recent) if r <= limit), self._recent_steps[0])
            self._since_back.extend((r, t.at(s)) for s, r in zip(self._recent_steps, self._recent) if s >= self._back_step)
        elif self._back_step is not None:
            self._since_back.append((loss - expected, expected))
        shift_ratio, shift_z = self._shift()
        verdict = self._verdict(sigmas, ratio, on_track, full, shift_ratio, shift_z)
        decided = verdict in ("recovered", "recovered_with_damage") and on_track or step - self.onset_step >= cfg.patience_steps
        state = RecoveryState(step, verdict if decided else "pending", decided, ratio, sigmas, self._back_step,
                              shift_ratio, shift_z)
        self._last = state
        return state

    def _shift(self) -> tuple[float, float]:
        """The lasting shift since back on the trajectory: (mean excess / trajectory, its z).

        The z counts two errors: the mean's own (`lasting_excess`, the noise after the incident) and
        the trajectory's (`extrapolation_se`, where the healthy run would have been)."""
        if len(self._since_back) < self.config.hold_steps:
            return math.nan, math.nan
        residuals, expected = zip(*self._since_back)
        mean, se = lasting_excess(residuals, self.trajectory.sigma)
        level = float(np.mean(expected))
        se = math.hypot(se, self.extrapolation_se(level))
        return (mean / level if level > 0 else math.nan), (mean / se if se > 0 else math.inf * np.sign(mean))

    def tolerance(self, step: int) -> float:
        """Largest median excess over `hold_steps` (loss units) at `step` that counts as back on the
        trajectory: `tolerance_sigma` times the healthy steps' spread around it or the trajectory's own
        uncertainty there (`extrapolation_se`), whichever is larger; never below `min_damage_ratio`."""
        cfg, t = self.config, self.trajectory
        expected = t.at(step)
        spread = t.sigma if t.fit_steps == 0 else max(t.sigma, self.extrapolation_se(expected, backtest=False))
        return max(cfg.tolerance_sigma * spread, cfg.min_damage_ratio * expected)

    def extrapolation_se(self, expected: float, *, backtest: bool = True) -> float:
        """Uncertainty, in loss units, of the trajectory where it expects the loss `expected`: the
        standard error of its level at the anchor (at least its miss at its own end); the progress it
        expects past the anchor, taken as uncertain (`_PROGRESS_SD` of it); and `_BACKTEST_SHARE` of how
        far the same method missed on this run's own history (`backtest_error`). Infinite without a
        fitted trajectory (fewer than `min_fit_steps` healthy steps): no shift can be measured then.
        `backtest=False` leaves the backtest out: a history that holds an earlier incident's step
        misses by that step, which says nothing about where this incident's loss counts as back."""
        t = self.trajectory
        if t.fit_steps == 0:
            return math.inf
        progress = max(0.0, t.intercept + t.slope * t.anchor - expected)
        level_se = t.level_se if math.isfinite(t.level_se) else 0.0
        missed = _BACKTEST_SHARE * self.backtest_error * expected if backtest else 0.0
        return math.sqrt(level_se**2 + (_PROGRESS_SD * progress) ** 2 + missed**2)

    def shift_floor(self) -> float:
        """Smallest shift (a share of the trajectory) that counts as damage: `damage_floor`, and
        `damage_sigmas` of the healthy steps' spread around the trajectory (what a healthy run wanders)."""
        if not self._since_back:
            return self.config.damage_floor
        level = float(np.mean([e for _, e in self._since_back]))
        wander = self.config.damage_sigmas * self.trajectory.sigma / level if level > 0 else 0.0
        return max(self.config.damage_floor, wander)

    def _damaged(self, shift_ratio: float, shift_z: float) -> bool:
        """Back on the trajectory, but shifted above it: both real (`damage_z` standard errors) and large enough to matter."""
        return shift_z >= self.config.damage_z and shift_ratio >= self.shift_floor()

    def _verdict(self, sigmas: float, ratio: float, on_track: bool, full: bool,
                 shift_ratio: float = math.nan, shift_z: float = math.nan) -> str:  # fmt: skip
        if on_track:
            return "recovered_with_damage" if self._damaged(shift_ratio, shift_z) else "recovered"
        if not full:
            return "persistent"
        if sigmas > self.config.band_sigma:
            # Still out of the band: rising to its worst yet is a divergence, staying up persistent.
            return "divergence" if sigmas >= self._peak_excess and ratio > 0.5 else "persistent"
        return "recovered_with_damage"

    @property
    def shift_steps(self) -> int:
        """Steps since back on the trajectory that the lasting-shift test holds (at most `damage_steps`)."""
        return len(self._since_back)

    @property
    def last(self) -> RecoveryState | None:
        """The latest state (None before the first update)."""
        return self._last

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here; plain JSON types only."""
        return {
            "format": _STATE_FORMAT,
            "backtest_error": self.backtest_error,
            "config": asdict(self.config),
            "onset_step": self.onset_step,
            "trajectory": asdict(self.trajectory),
            "recent": list(self._recent),
            "recent_steps": list(self._recent_steps),
            "nonfinite_run": self._nonfinite_run,
            "back_step": self._back_step,
            "peak_excess": None if self._peak_excess == -math.inf else self._peak_excess,
            "since_back": [list(pair) for pair in self._since_back],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; raises ValueError when it is malformed or from other settings."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a recovery tracker state of format {_STATE_FORMAT}")
        if state.get("config") != asdict(self.config):
            raise ValueError("recovery tracker state was saved with other RecoveryConfig settings; build the tracker with them")
        try:
            t = state["trajectory"]
            self.onset_step = int(state["onset_step"])
            self.trajectory = Trajectory(float(t["intercept"]), float(t["slope"]), float(t["sigma"]), int(t["fit_steps"]),
                                         float(t["anchor"]), float(t["slope_share"]), float(t["level_se"]))
            self._recent = deque((float(v) for v in state["recent"]), maxlen=self.config.hold_steps)
            self._recent_steps = deque((int(v) for v in state["recent_steps"]), maxlen=self.config.hold_steps)
            self._nonfinite_run = int(state["nonfinite_run"])
            self._back_step = None if state["back_step"] is None else int(state["back_step"])
            peak = state["peak_excess"]
            self._peak_excess = -math.inf if peak is None else float(peak)
            self._since_back = deque(((float(r), float(e)) for r, e in state["since_back"]), maxlen=self.config.damage_steps)
            self.backtest_error = float(state["backtest_error"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed recovery tracker state: {exc}") from None


@dataclass(frozen=True)
class Recovery:
    """`judge_recovery`'s answer for one incident."""

    verdict: str
    """One of VERDICTS."""
    back_step: int | None
    """First step of the first stretch back on the trajectory (None: never)."""
    damage_step: int
    """Step the lasting damage was measured at (`horizon_steps` after the end, or the last step)."""
    excess_ratio: float
    excess_sigma: float
    trajectory: Trajectory
    observed_steps: int
    """Steps after the incident's end that the judgement saw (fewer than the horizon: the run ended)."""
    shift_ratio: float = math.nan
    """Mean excess over the trajectory from `back_step` on (up to `damage_steps`) / the trajectory."""
    shift_z: float = math.nan
    """That mean in its own autocorrelation-robust standard errors."""
    shift_steps: int = 0
    """Steps that mean is over."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "back_step": self.back_step,
            "damage_step": self.damage_step,
            "excess_ratio": self.excess_ratio,
            "excess_sigma": self.excess_sigma,
            "shift_ratio": self.shift_ratio,
            "shift_z": self.shift_z,
            "shift_steps": self.shift_steps,
            "observed_steps": self.observed_steps,
            "trajectory": {"intercept": self.trajectory.intercept, "slope": self.trajectory.slope,
                           "sigma": self.trajectory.sigma, "fit_steps": self.trajectory.fit_steps},
        }


def judge_recovery(
    steps: np.ndarray,
    losses: np.ndarray,
    *,
    onset_step: int,
    end_step: int,
    healthy: np.ndarray | None = None,
    config: RecoveryConfig | None = None,
) -> Recovery | None:
    """Offline verdict on one incident: the tracker run from onset to `horizon_steps` after the end.

    Args:
        steps: the lineage's steps, in order.
        losses: its losses.
        onset_step: the incident's first flagged step.
        end_step: its last flagged step.
        healthy: mask of the steps that may fit the trajectory (not flagged); None: every finite one.
        config: settings.

    Returns:
        The `Recovery`, or None when no finite loss precedes the onset (nothing to compare with).

    Example:
        >>> import numpy as np
        >>> steps = np.arange(300)
        >>> loss = 4.0 - 0.2 * np.log(steps + 1.0)
        >>> loss[200:] += 0.3                      # a jump that never goes away
        >>> judge_recovery(steps, loss, onset_step=200, end_step=205).verdict
        'persistent'
    """
    config = config or RecoveryConfig()
    steps = np.asarray(steps)
    losses = np.asarray(losses, dtype=np.float64)
    before = steps < onset_step
    if healthy is not None:
        before &= np.asarray(healthy, dtype=bool)
    tracker = RecoveryTracker(onset_step, steps[before], losses[before], config=config)
    if not tracker.usable:
        return None
    stop = end_step + config.horizon_steps
    after = np.flatnonzero((steps >= onset_step) & (steps <= stop))
    state = None
    for i in after:
        state = tracker.update(int(steps[i]), float(losses[i]))
        if state.verdict == "divergence" and state.decided and not math.isfinite(state.excess_sigma):
            break
    if state is None:
        return None
    verdict = _final_verdict(tracker, state)
    observed = int(np.count_nonzero((steps > end_step) & (steps <= stop)))
    return Recovery(verdict, tracker.last.back_step if tracker.last else None, state.step,
                    state.excess_ratio, state.excess_sigma, tracker.trajectory, observed,
                    state.shift_ratio, state.shift_z, tracker.shift_steps)


def _final_verdict(tracker: RecoveryTracker, state: RecoveryState) -> str:
    # At the horizon (or the run's end) the verdict is what the last stretch says, decided or not;
    # a run that ends less than `hold_steps` after the incident is judged on the steps it has.
    if state.verdict != "pending":
        return state.verdict
    if not math.isfinite(state.excess_sigma):
        return "divergence"
    on_track = state.excess_sigma * tracker.trajectory.sigma <= tracker.tolerance(state.step)
    return tracker._verdict(state.excess_sigma, state.excess_ratio, on_track, True, state.shift_ratio, state.shift_z)
