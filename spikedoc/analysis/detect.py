"""Spike detection: one robust rolling baseline per series, streaming or offline, and incidents from its flags."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis.incident import Incident
from spikedoc.detector.streaming import DetectorConfig, Flag, StreamingDetector

__all__ = ["DetectorConfig", "Flag", "StreamingDetector", "flag_series", "find_incidents", "spike_score", "FLAG_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns of `flag_series`'s frame, in order (the fields of `Flag`).
FLAG_COLUMNS = ("step", "value", "baseline", "scale", "z", "flagged", "nonfinite", "warm", "readapted")


def flag_series(
    steps: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    config: DetectorConfig | None = None,
    *,
    log_scale: bool = False,
) -> pd.DataFrame:
    """Flag a whole series offline; identical, row for row, to feeding a `StreamingDetector`.

    Args:
        steps: Optimizer steps in time order (integers).
        values: The series (loss, grad norm, ...); NaN/inf are flagged as non-finite.
        config: Detector settings; None for the defaults.
        log_scale: Judge log(value) (natural for grad norms); non-positive values are not judged.

    Returns:
        A frame with `FLAG_COLUMNS`: step, value, baseline, scale, z, flagged, nonfinite, warm, readapted.

    Example:
        >>> loss = [3.0 + 0.01 * (i % 7) for i in range(300)]
        >>> loss[200] = 4.5
        >>> frame = flag_series(range(300), loss)
        >>> frame.loc[frame.flagged, "step"].tolist()
        [200]
    """
    step_arr = np.asarray(steps)
    value_arr = np.asarray(values, dtype=np.float64)
    if step_arr.shape != value_arr.shape or step_arr.ndim != 1:
        raise ValueError(f"steps and values must be 1-D and of one length, got {step_arr.shape} and {value_arr.shape}")
    if step_arr.size and not np.issubdtype(step_arr.dtype, np.integer):
        as_float = step_arr.astype(np.float64)
        if not (np.isfinite(as_float).all() and (as_float == np.round(as_float)).all()):
            raise ValueError("steps must be whole numbers (optimizer step indices)")
    step_arr = step_arr.astype(np.int64)
    detector = StreamingDetector(config, log_scale=log_scale)
    frame = pd.DataFrame.from_records(detector._run(step_arr.tolist(), value_arr.tolist()), columns=FLAG_COLUMNS[2:])
    frame.insert(0, "value", value_arr)
    frame.insert(0, "step", step_arr)
    return frame.astype({"baseline": np.float64, "scale": np.float64, "z": np.float64})


def spike_score(values: Sequence[float] | np.ndarray, *, window: int = 1000, sigma: float = 7.0) -> float:
    """OLMo 2's spike score: the share of steps more than `sigma` std above the rolling mean of the
    previous `window` values.

    Computed on the finite values, each judged against the mean and (population) standard deviation
    of up to `window` finite values before it, from the third value on (two are needed for a spread).
    Unlike the detector, every value enters the rolling statistics, spikes included, as in the paper.

    Args:
        values: The series, in step order.
        window: Previous values in the rolling mean and std (1000 in OLMo 2).
        sigma: Standard deviations above the mean that count as a spike (7 in OLMo 2).

    Returns:
        A fraction in [0, 1] (multiply by 100 for the paper's percentage); nan with fewer than 3 values.

    Example:
        >>> spike_score([1.0, 1.1] * 50 + [9.0])
        0.010101010101010102
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise ValueError(f"spike_score window must be an integer >= 2, got {window!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"spike_score sigma must be a finite number > 0, got {sigma!r}")
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return math.nan
    previous = pd.Series(x).shift(1).rolling(window, min_periods=2)
    mean, std = previous.mean().to_numpy(), previous.std(ddof=0).to_numpy()
    judged = ~np.isnan(mean)
    return float(np.count_nonzero(x[judged] > mean[judged] + sigma * std[judged]) / np.count_nonzero(judged))


def find_incidents(steps: pd.DataFrame, config: DetectorConfig | None = None) -> list[Incident]:
    """Incidents of a run's step table: loss and grad-norm spikes, divergences and non-finite values.

    Each series is flagged on its own (the grad norm on a log scale); flagged steps no more than
    `merge_gap` in-band observations apart form one episode; a grad-norm episode that overlaps a
    loss episode or ends at most `merge_lead` steps before it joins that loss incident. The
    detection fields of each `Incident` (`onset_step` ... `also_flagged`) describe `metric`, the
    series flagged first; `series` holds the same fields for every series involved.

    A grad norm that is non-finite on a step a GradScaler skipped is the scaler's normal overflow
    probe, not an incident, and is left out. A series with no finite value at all (all NaN) is
    skipped with a warning: NaN there cannot be told from "not recorded".

    Args:
        steps: Step table with `step` and `loss` and/or `grad_norm` columns, optionally `skipped`,
            in time order.
        config: Detector settings; None for the defaults.

    Returns:
        Incidents sorted by onset step, detection fields filled, diagnosis fields at their defaults.

    Example:
        >>> loss = [3.0 + 0.01 * (i % 7) for i in range(400)]
        >>> loss[300:303] = [5.0, 4.0, 3.5]
        >>> [(i.kind, i.onset_step, i.peak_step, i.end_step, i.recovered, i.recovery_step)
        ...  for i in find_incidents(pd.DataFrame({"step": range(400), "loss": loss}))]
        [('loss_spike', 300, 300, 302, True, 303)]
    """
    cfg = config if config is not None else DetectorConfig()
    if not isinstance(steps, pd.DataFrame):
        raise ValueError(f"find_incidents needs a pandas DataFrame, got {type(steps).__name__}")
    if "step" not in steps.columns or not {"loss", "grad_norm"} & set(steps.columns):
        raise ValueError(f"step table has columns {list(steps.columns)[:8]}; it needs `step` and `loss` or `grad_norm`")
    step = steps["step"].to_numpy()
    series = [("loss", step, steps["loss"].to_numpy(np.float64), False)] if "loss" in steps.columns else []
    if "grad_norm" in steps.columns:
        grad = steps["grad_norm"].to_numpy(np.float64)
        keep = np.ones(len(grad), dtype=bool)
        if "skipped" in steps.columns:
            skipped = steps["skipped"].astype("boolean").fillna(False).to_numpy(bool)
            keep = ~(skipped & ~np.isfinite(grad))
        series.append(("grad_norm", step[keep], grad[keep], cfg.grad_norm_log_scale))
    episodes: dict[tuple[str, bool], list[_Episode]] = {}
    for name, st, values, log_scale in series:
        if values.size and np.isnan(values).all():
            log.warning("column %r holds no value (all NaN): not recorded, or NaN from the first step; skipped", name)
            continue
        for ep in _episodes(name, flag_series(st, values, cfg, log_scale=log_scale), cfg, log_scale):
            episodes.setdefault((ep.series, ep.nonfinite), []).append(ep)
    incidents = []
    for nonfinite in (False, True):
        groups = _attach(episodes.get(("loss", nonfinite), []), episodes.get(("grad_norm", nonfinite), []), cfg.merge_lead)
        incidents.extend(_incident(group, nonfinite) for group in groups)
    return sorted(incidents, key=lambda inc: (inc.onset_step, inc.kind))


@dataclass
class _Episode:
    """Flagged observations of one series that belong together (detection fields of one series)."""

    series: str
    nonfinite: bool
    onset_step: int
    peak_step: int
    end_step: int
    magnitude_sigma: float
    peak_ratio: float
    baseline: float
    peak_value: float
    recovered: bool
    recovery_step: int | None
    low_confidence: bool
    persistent: bool
    onset_scale: float
    log_scale: bool

    def summary(self) -> dict[str, Any]:
        hidden = ("series", "nonfinite", "onset_scale", "log_scale")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in hidden}


def _episodes(name: str, frame: pd.DataFrame, cfg: DetectorConfig, log_scale: bool) -> list[_Episode]:
    # Group the flags exactly as the streaming streak does: split where more than merge_gap in-band
    # observations separate two flagged ones, and after a re-adaptation.
    step = frame["step"].to_numpy()
    value, z, base, scale = (frame[c].to_numpy() for c in ("value", "z", "baseline", "scale"))
    work = math.log if log_scale else float
    flagged, nonfinite, warm, readapted = (frame[c].to_numpy(bool) for c in ("flagged", "nonfinite", "warm", "readapted"))
    in_band = ~flagged & ~np.isnan(z)
    in_band_idx = np.flatnonzero(in_band)
    in_band_before = np.concatenate([[0], np.cumsum(in_band)])  # in-band rows in [0, k)
    out = []
    for is_nonfinite, mask in ((False, flagged & ~nonfinite), (True, nonfinite)):
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        gaps = in_band_before[idx[1:]] - in_band_before[idx[:-1] + 1]
        cut = (gaps > cfg.merge_gap) | (readapted[idx[:-1]] & ~is_nonfinite)
        for group in np.split(idx, np.flatnonzero(cut) + 1):
            first, last = group[0], group[-1]
            # The peak is the highest value, and its size is measured against the baseline at onset
            # (like peak_ratio): later in-band values may have moved the baseline since.
            peak = first if is_nonfinite else group[np.argmax(value[group])]
            magnitude = math.inf if is_nonfinite else (work(value[peak]) - work(base[first])) / scale[first]
            persistent = bool(readapted[last]) and not is_nonfinite
            after = np.searchsorted(in_band_idx, last, side="right")
            recovered = not persistent and after < in_band_idx.size
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = float(np.float64(value[peak]) / base[first])
            out.append(
                _Episode(
                    series=name,
                    nonfinite=is_nonfinite,
                    onset_step=int(step[first]),
                    peak_step=int(step[peak]),
                    end_step=int(step[last]),
                    magnitude_sigma=float(magnitude),
                    peak_ratio=ratio,
                    baseline=float(base[first]),
                    peak_value=float(value[peak]),
                    recovered=bool(recovered),
                    recovery_step=int(step[in_band_idx[after]]) if recovered else None,
                    low_confidence=not bool(warm[first]),
                    persistent=persistent,
                    onset_scale=float(scale[first]),
                    log_scale=log_scale,
                )
            )
    return out


def _attach(primary: list[_Episode], secondary: list[_Episode], lead: int) -> list[list[_Episode]]:
    # A secondary (grad-norm) episode joins the first primary (loss) episode it overlaps or precedes
    # by at most `lead` steps. Episodes of one series are disjoint and ordered, so ends are sorted.
    groups = [[p] for p in primary]
    ends = [p.end_step for p in primary]
    alone = []
    for s in secondary:
        i = int(np.searchsorted(ends, s.onset_step, side="left"))
        if i < len(primary) and s.end_step >= primary[i].onset_step - lead:
            groups[i].append(s)
        else:
            alone.append([s])
    return groups + alone


def _incident(group: list[_Episode], nonfinite: bool) -> Incident:
    per_series: dict[str, _Episode] = {}
    for ep in group:
        per_series[ep.series] = _combine(per_series[ep.series], ep) if ep.series in per_series else ep
    first = min(per_series.values(), key=lambda e: (e.onset_step, e.series != "loss"))
    loss = per_series.get("loss")
    if nonfinite:
        kind = "nonfinite"
    elif loss is not None:
        kind = "divergence" if loss.persistent else "loss_spike"
    else:
        kind = "grad_spike"
    recovered = all(e.recovered for e in per_series.values())
    return Incident(
        kind=kind,
        metric=first.series,
        onset_step=first.onset_step,
        peak_step=first.peak_step,
        end_step=max(e.end_step for e in per_series.values()),
        magnitude_sigma=first.magnitude_sigma,
        peak_ratio=first.peak_ratio,
        baseline=first.baseline,
        peak_value=first.peak_value,
        recovered=recovered,
        recovery_step=max(e.recovery_step for e in per_series.values()) if recovered else None,
        low_confidence=any(e.low_confidence for e in per_series.values()),
        also_flagged=sorted(name for name in per_series if name != first.series),
        series={name: e.summary() for name, e in sorted(per_series.items())},
    )


def _combine(a: _Episode, b: _Episode) -> _Episode:
    # Two episodes of one series inside one incident (e.g. two grad-norm bursts before a loss spike):
    # one episode from a's onset to b's end, its peak measured against a's onset baseline.
    peak = b if b.peak_value > a.peak_value else a
    work = math.log if a.log_scale else float
    size = a.magnitude_sigma if a.nonfinite else (work(peak.peak_value) - work(a.baseline)) / a.onset_scale
    return replace(
        a,
        peak_step=peak.peak_step,
        end_step=b.end_step,
        magnitude_sigma=size,
        peak_ratio=peak.peak_value / a.baseline if a.baseline else math.nan,
        peak_value=peak.peak_value,
        recovered=b.recovered,
        recovery_step=b.recovery_step,
        persistent=a.persistent or b.persistent,
    )
