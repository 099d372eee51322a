"""Incident: one spike, non-finite event or divergence, as found by detection and explained by diagnosis."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Incident", "KINDS", "CAUSES", "SEVERITIES", "joined"]

#: What the detector saw; `state_write`: a moment beyond its optimizer's exact bound (the state was
#: written from outside the optimizer), an incident whatever the loss did next.
KINDS = ("loss_spike", "grad_spike", "nonfinite", "divergence", "state_write")

#: How bad an incident is, from least to most (docs/analysis.md, "Severity").
SEVERITIES = ("minor", "moderate", "severe")

#: What diagnosis concluded (following the playbook in docs/analysis.md).
CAUSES = (
    "bad_batch",
    "grad_explosion",
    "optimizer_state",
    "numerics_rank",
    "lr_schedule",
    "lr_too_high",
    "state_reset",
    "unknown",
)


@dataclass(kw_only=True)
class Incident:
    """A run of consecutive flagged steps, merged into one event.

    Detection fills the fields up to `low_confidence`; diagnosis fills the rest.
    """

    kind: str
    """One of KINDS."""
    metric: str
    """The series that was flagged first: `loss` or `grad_norm`."""
    onset_step: int
    """First flagged step."""
    peak_step: int
    """Step of the largest deviation."""
    end_step: int
    """Last flagged step (the incident's last step out of the band)."""
    magnitude_sigma: float
    """Peak deviation in robust standard deviations of the baseline (inf for non-finite)."""
    peak_ratio: float
    """Peak value divided by the baseline at onset."""
    baseline: float
    """Baseline (rolling centre) at onset."""
    peak_value: float
    """Value of `metric` at `peak_step`."""
    recovered: bool
    """Detection alone (`find_incidents`): the series came back within the detector's band. After
    `analyze`: the loss came back onto its pre-incident trajectory and stayed (`verdict`
    `recovered`); the band is built to flag a spike, not to certify a recovery."""
    recovery_step: int | None = None
    """First step back (in the band, or on the trajectory after `analyze`), when `recovered`."""
    low_confidence: bool = False
    """Too little history before onset for a confident baseline."""
    also_flagged: list[str] = field(default_factory=list)
    """Other series flagged within the incident (e.g. `grad_norm` for a loss spike)."""
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per flagged series (`loss`, `grad_norm`): its own `onset_step`, `peak_step`, `end_step`,
    `magnitude_sigma`, `peak_ratio`, `baseline`, `peak_value`, `recovered`, `recovery_step`,
    `low_confidence` and `persistent`, since the fields above describe `metric` only."""

    # --- filled by diagnosis -------------------------------------------------
    verdict: str = "recovered"
    """The aftermath (`spikedoc.analysis.recovery.VERDICTS`): `recovered`, `recovered_with_damage`,
    `persistent` or `divergence`, judged against the pre-incident trajectory."""
    damage: dict[str, Any] = field(default_factory=dict)
    """The lasting damage behind `verdict`: `excess_ratio` and `excess_sigma` of the loss over the
    pre-incident trajectory at `damage_step`, `back_step`, `observed_steps`, `trajectory`."""
    severity: str = "moderate"
    """One of SEVERITIES: `minor` (recovered, small or loss never moved), `moderate` (recovered but
    large), `severe` (lasting damage, divergence, non-finite, reset state)."""
    cause: str = "unknown"
    """One of CAUSES."""
    handled_by_guard: bool = False
    """A `spikedoc.Guard` already vetoed every flagged step of it or rolled it back (its
    recommendation then records what the guard did)."""
    cause_guessed: bool = False
    """The cause rests on the shape of the loss alone: the evidence that would confirm it (batch
    fingerprints, per-tensor history, the LR) is not in the run."""
    evidence: list[str] = field(default_factory=list)
    """Human-readable sentences, each with its numbers, that decided `cause`."""
    batches: list[dict[str, Any]] = field(default_factory=list)
    """Per onset step: `step`, `sample_ids`, `anomalies[]` (sentences), and the raw fingerprint."""
    layers: list[dict[str, Any]] = field(default_factory=list)
    """Implicated tensors: `name`, `module`, `z`, `lead_steps`, ..."""
    precursor_lead_steps: int | None = None
    """Steps by which the earliest precursor (grad-norm or per-tensor flag) preceded the loss flag."""
    recommendation: dict[str, Any] = field(default_factory=dict)
    """`rollback_to_step`, `lr_factor`, `clip_max_norm`, `skip_steps`, `skip_sample_ids`, ..."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (non-finite floats become strings "inf"/"nan")."""
        return _jsonable(asdict(self))


def joined(a: Incident, b: Incident) -> Incident:
    """One incident from `a`'s onset to `b`'s end, of two detection incidents that are one event (a
    stretch of bad data whose loss went in and out of the band): the peak is the higher of the two,
    sized against `a`'s baseline; recovery is `b`'s.

    Example:
        >>> a = Incident(kind="loss_spike", metric="loss", onset_step=10, peak_step=10, end_step=12, magnitude_sigma=9.0,
        ...              peak_ratio=1.5, baseline=2.0, peak_value=3.0, recovered=True, recovery_step=13)
        >>> b = replace(a, onset_step=15, peak_step=16, end_step=18, magnitude_sigma=12.0, peak_value=4.0, recovery_step=19)
        >>> j = joined(a, b); (j.onset_step, j.peak_step, j.end_step, j.peak_ratio, j.recovery_step)
        (10, 16, 18, 2.0, 19)
    """
    series = dict(a.series)
    for name, later in b.series.items():
        series[name] = _joined_series(series[name], later) if name in series else later
    top = b if b.peak_value > a.peak_value else a
    return replace(
        a, peak_step=top.peak_step, end_step=max(a.end_step, b.end_step), peak_value=top.peak_value,
        peak_ratio=top.peak_value / a.baseline if a.baseline else float("nan"),
        magnitude_sigma=max(a.magnitude_sigma, b.magnitude_sigma), recovered=b.recovered, recovery_step=b.recovery_step,
        low_confidence=a.low_confidence, also_flagged=sorted((set(a.also_flagged) | set(b.also_flagged) | set(series)) - {a.metric}),
        series=series,
    )


def _joined_series(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    top = b if b["peak_value"] > a["peak_value"] else a
    base = a["baseline"]
    return {**a, "peak_step": top["peak_step"], "peak_value": top["peak_value"],
            "peak_ratio": top["peak_value"] / base if base else float("nan"),
            "magnitude_sigma": max(a["magnitude_sigma"], b["magnitude_sigma"]), "end_step": b["end_step"],
            "recovered": b["recovered"], "recovery_step": b["recovery_step"],
            "persistent": bool(a.get("persistent")) or bool(b.get("persistent"))}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value
