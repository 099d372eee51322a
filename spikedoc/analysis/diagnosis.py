"""`analyze()`: detect incidents along each lineage of a run, attribute and explain each, lint the setup.

The pass over the run's lineages is `_pass.AnalysisPass`; what it does per incident, `_per_incident`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._pass import AnalysisPass
from spikedoc.analysis._rundata import has_finite, reduce_ranks
from spikedoc.analysis.advice import to_act_on
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.detect import DetectorConfig
from spikedoc.analysis.guard_actions import guard_actions, guard_handling
from spikedoc.analysis.incident import Incident, _jsonable
from spikedoc.analysis.lineage import Lineage
from spikedoc.analysis.lints import Finding
from spikedoc.errors import RunFormatError

__all__ = ["Diagnosis", "analyze", "DIAGNOSIS_FORMAT"]

_log = logging.getLogger(__name__)

#: Version of the `Diagnosis.to_dict()` shape (docs/analysis.md); bumped on incompatible changes.
DIAGNOSIS_FORMAT = 2




@dataclass(kw_only=True)
class Diagnosis:
    """What `analyze` found in a run.

    Example:
        >>> d = spikedoc.analyze("runs/exp1")  # doctest: +SKIP
        >>> d.healthy, [(i.onset_step, i.cause) for i in d.incidents]  # doctest: +SKIP
        (False, [(4512, 'bad_batch')])
    """

    path: str
    source: str
    incidents: list[Incident] = field(default_factory=list)
    context: list[dict[str, Any]] = field(default_factory=list)
    """Per incident (same order): `segment`, `lr_at_onset`, `lr_jump`, `clipping`, `loss_scale`,
    `ranks`, `groups` (per module kind), `optimizer_precursors`, `low_confidence_note`."""
    findings: list[Finding] = field(default_factory=list)
    spike_score: dict[str, float | None] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    """`first_step`, `last_step`, `steps`, `ranks`, `segments`, `resumes`, `abandoned`."""
    guard_actions: list[dict[str, Any]] = field(default_factory=list)
    """What a `spikedoc.Guard` did, in order (`guard_actions.guard_actions`): `kind`, `step`, `segment`, `detail`."""
    holes: list[dict[str, Any]] = field(default_factory=list)
    """Steps the run should hold and does not (`Run.holes`): `table`, `rank`, `segment`, `first_step`,
    `last_step` (None: past the steps read), `cause`, `text`. No incident is inferred across one."""

    @property
    def complete(self) -> bool:
        """The run has no holes (the CLI's exit code 3 when it has, and no incident needs attention)."""
        return not self.holes

    @property
    def healthy(self) -> bool:
        """No incident was found."""
        return not self.incidents

    @property
    def needs_attention(self) -> bool:
        """Some incident not already handled by a guard has advice to act on: a rollback, data to
        skip, a setting or code to fix (the CLI's exit code 1). A severe incident always has a
        rollback; an incident whose only advice is "no action needed" never makes the run need attention."""
        return any(to_act_on(i.recommendation) and not i.handled_by_guard for i in self.incidents)

    def to_dict(self) -> dict[str, Any]:
        """The documented, stable JSON shape (docs/analysis.md, "JSON output")."""
        incidents = []
        for incident, ctx in zip(self.incidents, self.context):
            entry = incident.to_dict()
            entry["segment"] = ctx.get("segment", 0)
            entry["context"] = _jsonable(ctx)
            incidents.append(entry)
        return _jsonable({
            "format": DIAGNOSIS_FORMAT,
            "path": self.path,
            "source": self.source,
            "healthy": self.healthy,
            "needs_attention": self.needs_attention,
            "summary": self.summary,
            "spike_score": self.spike_score,
            "incidents": incidents,
            "findings": [f.to_dict() for f in self.findings],
            "missing": self.missing,
            "warnings": self.warnings,
            "guard_actions": self.guard_actions,
            "holes": self.holes,
        })


def analyze(run: Any, *, config: AnalysisConfig | DetectorConfig | None = None) -> Diagnosis:
    """Find, attribute and explain the incidents of a run, and lint its configuration.

    Args:
        run: a run directory, a CSV file, a TensorBoard log directory (anything `spikedoc.load`
            reads), or an already loaded `Run`.
        config: `AnalysisConfig` (or just a `DetectorConfig`); None for the defaults.

    Returns:
        The `Diagnosis`.

    Raises:
        SpikedocError: the input is unusable (missing path, corrupt run, no finite loss).

    Example:
        >>> import spikedoc
        >>> diagnosis = spikedoc.analyze("runs/exp1")  # doctest: +SKIP
        >>> print(diagnosis.to_dict()["incidents"][0]["recommendation"])  # doctest: +SKIP
    """
    from spikedoc.store.reader import Run, load  # the reader pulls in pyarrow; only needed here

    if isinstance(config, DetectorConfig):
        config = AnalysisConfig(detector=config)
    config = config or AnalysisConfig()
    if not isinstance(run, Run):
        run = load(run)
    steps = _checked_steps(run)
    diagnosis = Diagnosis(path=str(run.path), source=run.source, missing=list(run.missing), warnings=list(run.warnings),
                          holes=[h.to_dict() for h in run.holes])
    reduced = reduce_ranks(steps)
    lineage = Lineage(reduced)
    # The guard's own LR changes (its cut at a rollback, the undo) are known first: they are neither findings nor causes.
    diagnosis.guard_actions = guard_actions(run.events)
    AnalysisPass(run, steps, lineage, config, diagnosis).execute()
    # Reading layer windows can meet a damaged part only now: its warning must reach the report too.
    diagnosis.warnings += [w for w in run.warnings if w not in diagnosis.warnings]
    if diagnosis.guard_actions:
        _credit_guard(diagnosis)
    return diagnosis


def _credit_guard(diagnosis: Diagnosis) -> None:
    # What the guard already did is not advice to give again: a handled incident's advice is the record of it.
    for inc, ctx in zip(diagnosis.incidents, diagnosis.context):
        handling = guard_handling(inc.onset_step, inc.end_step, ctx.get("segment", 0), diagnosis.guard_actions)
        if handling is None:
            continue
        ctx["guard"] = {k: v for k, v in handling.items() if k != "rollback"} | {"rolled_back": handling["rollback"] is not None}
        if _vetoed_until_rollback(inc, handling):
            # No update was applied after onset in this segment: what the loss did there is the
            # vetoed batches' loss, not damage to the model; the replay is judged as its own incident.
            inc.verdict, inc.damage = "rolled_back", {}
            ctx.setdefault("notes", []).append(
                f"the guard vetoed every step from {inc.onset_step} (or probed it) until it rolled back at step "
                f"{handling['rollback']['detail']['from_step']}: the losses after onset are of batches never trained "
                "on, so no lasting damage is measured here (the replay after the rollback is judged on its own)")
        if handling["handled"]:
            inc.handled_by_guard = True
            inc.recommendation.update(rollback=False, actions=[{"action": "guard_handled", "because": handling["because"]}])
        else:
            inc.recommendation["actions"].insert(0, {"action": "guard_acted", "because": handling["because"]})


def _vetoed_until_rollback(inc: Incident, handling: dict[str, Any]) -> bool:
    """Every step from onset up to the rollback that left this segment was vetoed (or a probe step)."""
    rollback = handling["rollback"]
    until = rollback["detail"].get("from_step") if rollback is not None else None
    never_applied = set(handling["vetoed"]) | set(handling.get("probes", []))
    return isinstance(until, int) and until > inc.onset_step and set(range(inc.onset_step, until)) <= never_applied


def _checked_steps(run: Any) -> pd.DataFrame:
    """The step table, with an all-NaN `loss` column when none was recorded (the grad norm carries the analysis)."""
    steps = run.steps
    if steps is None or steps.empty:
        raise RunFormatError(f"{run.path} has no step rows: nothing to analyse")
    if not (has_finite(steps, "loss") or has_finite(steps, "grad_norm")):
        raise RunFormatError(
            f"{run.path}: neither a loss nor a grad norm with a finite value ({len(steps)} rows): nothing to analyse; "
            "record the loss with monitor.record(loss=...) or log a `loss` column"
        )
    if "loss" not in steps.columns:  # one shape for "no column" and "never captured" (NaN)
        steps = steps.assign(loss=np.nan)
    return steps



