"""`analyze()`: detect incidents along each lineage of a run, attribute and explain each, lint the setup."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import parameter_modules, watch_config
from spikedoc.analysis._robust import fmt, fmt_span, steps_text
from spikedoc.analysis._rundata import PieceData, checkpoints_of, clip_in_use, in_ranges, reduce_ranks, score, segment_ranges
from spikedoc.analysis.attribution import attribute_batches, attribute_layers, batch_profile, hash_history
from spikedoc.analysis.causes import Evidence, cause_guessed, decide_cause, recommend, severity, to_act_on
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.context import (
    clipping_before,
    loss_scale_drops,
    lr_at,
    lr_discontinuities,
    rank_divergence,
    update_without_grad,
    warmup,
)
from spikedoc.analysis.detect import DetectorConfig, find_incidents, flag_series
from spikedoc.analysis.guard_actions import guard_actions, guard_handling, without_guard_lr_changes
from spikedoc.analysis.incident import Incident, _jsonable, joined
from spikedoc.analysis.lineage import Lineage, check_resume, moments_ratio
from spikedoc.analysis.lints import Finding, lint
from spikedoc.analysis.change_points import change_point_incidents, weight_returns
from spikedoc.analysis.lr_response import lr_jump_incidents, untested_jumps
from spikedoc.analysis.onset import build_up, first_nonfinite, grad_precursor, one_step, param_reset, reset_level
from spikedoc.analysis.recovery import RecoveryConfig, judge_recovery
from spikedoc.analysis.schedule import scheduled_restarts
from spikedoc.errors import RunFormatError

__all__ = ["Diagnosis", "analyze", "DIAGNOSIS_FORMAT"]

_log = logging.getLogger(__name__)

#: Version of the `Diagnosis.to_dict()` shape (docs/analysis.md); bumped on incompatible changes.
DIAGNOSIS_FORMAT = 2
# Candidate batches: the onset step and the two before it (the update of step t shows in the loss of t+1).
_CANDIDATES = 2
#: Steps past an incident's peak read for optimizer-state statistics the onset step lacked: under a
#: cost budget every step after a flagged one is full again, and rows are assembled a step or two late
#: (the spike suite's optimizer_state run under budget=0.02: onset 151, next full step 154).
_STATE_LOOKAHEAD = 10
# Healthy steps before a lineage's first incident that are enough to profile its normal batches.
_PROFILE_STEPS = 50
# Per-incident context reaches this many lookbacks before onset (clipping's "earlier in the run",
# the update-norm history).
_CONTEXT = 10


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
    _Analysis(run, steps, lineage, config, diagnosis).execute()
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
                f"the guard vetoed every step from {inc.onset_step} until it rolled back at step "
                f"{handling['rollback']['detail']['from_step']}: the losses after onset are of batches never trained "
                "on, so no lasting damage is measured here (the replay after the rollback is judged on its own)")
        if handling["handled"]:
            inc.handled_by_guard = True
            inc.recommendation.update(rollback=False, actions=[{"action": "guard_handled", "because": handling["because"]}])
        else:
            inc.recommendation["actions"].insert(0, {"action": "guard_acted", "because": handling["because"]})


def _vetoed_until_rollback(inc: Incident, handling: dict[str, Any]) -> bool:
    """Every step from onset up to the rollback that left this segment was vetoed."""
    rollback = handling["rollback"]
    until = rollback["detail"].get("from_step") if rollback is not None else None
    return isinstance(until, int) and until > inc.onset_step and set(range(inc.onset_step, until)) <= set(handling["vetoed"])


def _checked_steps(run: Any) -> pd.DataFrame:
    """The step table, with an all-NaN `loss` column when none was recorded (the grad norm carries the analysis)."""
    steps = run.steps
    if steps is None or steps.empty:
        raise RunFormatError(f"{run.path} has no step rows: nothing to analyse")
    if not (_has_finite(steps, "loss") or _has_finite(steps, "grad_norm")):
        raise RunFormatError(
            f"{run.path}: neither a loss nor a grad norm with a finite value ({len(steps)} rows): nothing to analyse; "
            "record the loss with monitor.record(loss=...) or log a `loss` column"
        )
    if "loss" not in steps.columns:  # one shape for "no column" and "never captured" (NaN)
        steps = steps.assign(loss=np.nan)
    return steps


def _has_finite(steps: pd.DataFrame, column: str) -> bool:
    return column in steps.columns and bool(np.isfinite(pd.to_numeric(steps[column], errors="coerce").to_numpy(dtype=float)).any())


class _Analysis:
    """One analysis pass; holds what the per-incident steps share."""

    def __init__(self, run, steps, lineage: Lineage, config: AnalysisConfig, out: Diagnosis) -> None:
        self.run, self.steps, self.lineage, self.config, self.out = run, steps, lineage, config, out
        self.detector = config.detector if config.detector is not None else DetectorConfig()
        self.meta = run.meta or {}
        self.multi_rank = "rank" in steps.columns and steps["rank"].nunique() > 1
        self.run_profile = batch_profile(steps)
        self.profile = self.run_profile
        self.module_types = parameter_modules(self.meta)
        self.checkpoints = checkpoints_of(run.events)
        self.clip = clip_in_use(self.meta, steps)
        self.has_grad = "grad_norm" in steps.columns and bool(np.isfinite(pd.to_numeric(steps["grad_norm"], errors="coerce")).any())
        layer_every = (watch_config(self.meta) or {}).get("layer_every")
        self.layer_every = int(layer_every) if isinstance(layer_every, int) and layer_every > 0 else 1
        # First step after each hole in the step table: the detector's baseline restarts there.
        self.after_holes = {h.last_step + 1 for h in run.holes if h.table == "steps" and h.last_step is not None
                            and h.first_step is not None}

    def execute(self) -> None:
        out, lineage = self.out, self.lineage
        if not self.run.has_layers and "layers" not in out.missing:
            out.missing.append("layers")
        for column in ("loss", "grad_norm", "lr"):
            if not _has_finite(self.steps, column) and column not in out.missing:
                out.missing.append(column)
        if "loss" in out.missing:
            out.warnings.append(
                "no finite loss recorded: incidents are found on the grad norm alone, and nothing is said about the "
                "loss (its spikes, divergence, recovery, resumes); record it with monitor.record(loss=loss)"
            )
        resumes, jumps_found, restarts = [], [], []
        for piece in lineage.pieces:
            frame = lineage.frame(piece.index)
            own = frame.loc[frame["_own"]]
            resume = check_resume(lineage, piece.index, config=self.config)
            ratio = self._moments_ratio(piece) if piece.resumed else None
            if resume is not None:
                resumes.append((piece, resume, ratio))
            jumps = without_guard_lr_changes(lr_discontinuities(frame, config=self.config), out.guard_actions)
            jumps = [j for j in jumps if j["step"] not in self.after_holes]
            starts = {p.first_step: p.segment for p in lineage.pieces if p.resumed and p.index <= piece.index}
            own_steps = set(own["step"].tolist())
            for jump in jumps:
                jump["at_resume"] = starts.get(jump["step"]) if jump["step"] in starts else None
            scheduled = scheduled_restarts(frame, jumps, self.meta, [int(frame["step"].iloc[0]), *starts])
            restarts += [j for j in jumps if (j["step"], j["group"]) in scheduled and j["step"] in own_steps]
            jumps = [j for j in jumps if (j["step"], j["group"]) not in scheduled]
            jumps_found += [j for j in jumps if j["step"] in own_steps]
            detection = self._detection_frame(frame, own)
            found = self._in_warmup(self._find_between_holes(detection), frame)
            ups = [j["step"] for j in jumps if j["direction"] == "up"]
            found += lr_jump_incidents(detection, jumps, found, self.detector, self.config)
            points = [{"step": r["step"], "why": "weights"} for r in weight_returns(frame, self.config)]
            points += [{"step": j["step"], "why": "lr"} for j in untested_jumps(detection, jumps, self.detector, self.config)]
            found += change_point_incidents(frame, [p for p in points if p["step"] in own_steps], found, self.config)
            found = sorted((i for i in found if i.onset_step in own_steps), key=lambda i: (i.onset_step, i.kind))
            self.profile = self._profile_before(frame, found)
            found = self._one_per_stretch(found, frame)
            shared = PieceData(frame, hash_history(self._rows_of(frame)) if found else {},
                               self._lineage_checkpoints(frame) if found else [],
                               healthy=self._healthy(frame, detection) if found else None,
                               first_up_jump=min(ups) if ups else None,
                               piece=piece, incidents=found, jumps=jumps, resume=resume, moments_ratio=ratio)
            for incident in found:
                ctx = self._diagnose(incident, shared)
                out.incidents.append(incident)
                out.context.append(ctx)
        final = lineage.final()
        out.spike_score = {
            "loss": score(final, "loss"),
            "grad_norm": score(final, "grad_norm"),
        }
        out.findings = lint(self.meta, final)
        out.findings += self._resume_findings(resumes)
        out.findings += _jump_findings(jumps_found)
        out.summary = {
            "first_step": int(self.steps["step"].min()),
            "last_step": int(self.steps["step"].max()),
            "steps": int(len(final)),
            "ranks": int(self.steps["rank"].nunique()) if "rank" in self.steps.columns else 1,
            "segments": len(lineage.pieces),
            "resumes": [{"segment": p.segment, "step": p.first_step, "state_reset": r.state_reset, "moments_ratio": m}
                        for p, r, m in resumes],
            "abandoned": lineage.abandoned_steps(),
            "scheduled_restarts": [{"step": j["step"], "group": j["group"], "before": j["before"], "after": j["after"]}
                                   for j in restarts],
        }
        if len(final) < self.detector.min_history:
            out.warnings.append(
                f"only {len(final)} step{'s' if len(final) != 1 else ''}: fewer than the {self.detector.min_history} "
                "the detector needs for a confident "
                "baseline, so only large relative jumps can be judged"
            )

    # ------------------------------------------------------------------------- per incident

    def _stretch(self, onset_batches: list[dict[str, Any]], frame: pd.DataFrame, hashes: dict[str, Any],
                 onset: int, end: int) -> list[dict[str, Any]]:
        """Batches after onset flagged the way an anomalous onset batch is: those up to the incident's
        end, and the unbroken run of them just after it (bad data whose loss was back in the band)."""
        flags = {f for b in onset_batches for f in b["flags"]}
        if not flags:
            return []
        later = frame.loc[(frame["step"] > onset) & (frame["step"] <= end + self.config.lookback)]
        batches = attribute_batches(self._rows_of(later), profile=self.profile, hashes=hashes, config=self.config)
        inside = [b for b in batches if b["step"] <= end and flags & set(b["flags"])]
        after = []
        for b in (b for b in batches if b["step"] > end):
            if not flags & set(b["flags"]) or b["step"] != (after[-1]["step"] if after else end) + 1:
                break
            after.append(b)
        return inside + after

    def _profile_before(self, frame: pd.DataFrame, found: list[Incident]) -> Any:
        """What a normal batch of this lineage looks like: its batches before the first incident, when
        there are enough of them; a stretch of bad data that lasts would otherwise widen the whole
        run's spread until its own batches look normal."""
        if not found:
            return self.run_profile
        before = frame.loc[frame["step"] < found[0].onset_step]
        return batch_profile(self._rows_of(before)) if len(before) >= _PROFILE_STEPS else self.run_profile

    def _one_per_stretch(self, found: list[Incident], frame: pd.DataFrame) -> list[Incident]:
        """Join consecutive loss incidents that one stretch of anomalous batches spans: every batch from
        the first incident's onset (or the two steps before) to the next one's onset shares an anomaly."""
        out: list[Incident] = []
        for inc in found:
            prev = out[-1] if out else None
            if prev is not None and "loss" in prev.series and "loss" in inc.series \
                    and inc.onset_step - prev.end_step <= self.config.lookback and self._bridged(prev, inc, frame):
                out[-1] = joined(prev, inc)
            else:
                out.append(inc)
        return out

    def _bridged(self, a: Incident, b: Incident, frame: pd.DataFrame) -> bool:
        rows = frame.loc[(frame["step"] >= a.onset_step - _CANDIDATES) & (frame["step"] <= b.onset_step)]
        batches = attribute_batches(self._rows_of(rows), profile=self.profile, hashes={}, config=self.config)
        flags = {f for x in batches if x["step"] <= a.onset_step for f in x["flags"]}
        between = [x for x in batches if a.end_step < x["step"] <= b.onset_step]
        steps = frame.loc[(frame["step"] > a.end_step) & (frame["step"] <= b.onset_step), "step"]
        return bool(flags) and len(between) == len(steps) and all(flags & set(x["flags"]) for x in between)

    def _diagnose(self, inc: Incident, shared: PieceData) -> dict[str, Any]:
        cfg, piece = self.config, shared.piece
        onset, peak, end = inc.onset_step, max(inc.peak_step, inc.onset_step), inc.end_step
        # Everything below looks at most `_CONTEXT * lookback` steps back, so it works on a slice:
        # a run with a thousand incidents then costs a thousand small windows, not full passes.
        frame = shared.window(onset - _CONTEXT * cfg.lookback, end)
        hashes = shared.hashes
        loss_series = inc.series.get("loss")
        loss_flag = loss_series["onset_step"] if loss_series else None
        reference = loss_flag if loss_flag is not None else onset
        ev = Evidence(loss_flag_step=loss_flag)
        ev.one_step = one_step(inc, frame)
        candidates = frame.loc[(frame["step"] >= onset - _CANDIDATES) & (frame["step"] <= onset)]
        ev.batches = attribute_batches(self._rows_of(candidates), profile=self.profile, hashes=hashes, config=cfg)
        ev.stretch = self._stretch(ev.batches, shared.window(onset, end + cfg.lookback), hashes, onset, end)
        if self.run.has_layers:
            # A few steps past the peak: state statistics that skipped the onset (a cost budget's light
            # steps, `layer_every`) come at the first step that has them again.
            ahead = peak + max(_STATE_LOOKAHEAD, self.layer_every)
            layer_frame = shared.window(onset - _CONTEXT * cfg.lookback, max(end, ahead))
            layers = self._layers(layer_frame, onset - cfg.lookback - max(cfg.layer_history, 32 * self.layer_every), ahead)
            ev.layers = attribute_layers(layers, onset=onset, peak=peak, reference=reference,
                                         module_types=self.module_types, config=cfg)
        ev.grad_precursor = grad_precursor(inc, loss_flag, shared.incidents, cfg)
        ups = [j for j in shared.jumps if j["direction"] == "up" and onset - cfg.lookback <= j["step"] <= onset]
        # The latest jump, as one discontinuity of every param group that jumped at that step.
        ev.lr_jump = _one_per_step([j for j in ups if j["step"] == ups[-1]["step"]])[0] if ups else None
        ev.lr_onset = lr_at(frame, onset)
        ev.warmup = shared.warmup
        ev.clipping = clipping_before(frame, onset, config=cfg)
        ev.loss_scale = loss_scale_drops(frame, onset - cfg.lookback, end)
        if self.multi_rank:
            ev.ranks = rank_divergence(self._rows_of(frame, window=(onset - 3 * cfg.lookback, end)),
                                       onset, end, config=cfg)
        if shared.resume is not None and piece.first_step <= onset <= piece.first_step + cfg.lookback:
            ev.resume, ev.moments_ratio = shared.resume, shared.moments_ratio
        ev.update_step = update_without_grad(frame, onset, peak, config=cfg)
        ev.lookback_steps = int(((frame["step"] >= onset - cfg.lookback) & (frame["step"] < onset)).sum())
        ev.has_grad = self.has_grad
        ev.has_loss = "loss" not in self.out.missing
        if "grad_norm" in frame.columns:
            prior = frame.loc[frame["step"] < onset, "grad_norm"]
            ev.grad_before = float(prior.iloc[-1]) if len(prior) else math.nan
        for name, series in inc.series.items():
            if "level_sigma" in series:
                ev.notes.append(
                    f"found by the LR-jump test: the mean {name} z-score over the {cfg.lr_response_steps} steps from the "
                    f"jump was {fmt(series['level_sigma'], 2)} sigma above the run's earlier {cfg.lr_response_steps}-step windows "
                    f"(threshold {fmt(cfg.lr_response_sigma, 2)}); no single step crossed the detector's threshold"
                )
        if inc.low_confidence:
            ev.notes.append("too little history before onset for a confident baseline: treat the size with care")

        self._judge_aftermath(inc, shared, ev)
        ev.minor = severity(inc, cfg) == "minor"
        ev.first_nonfinite = first_nonfinite(inc, frame, ev.layers)
        ev.build_up = build_up(inc, ev, ev.first_nonfinite["step"] if ev.first_nonfinite else reference, cfg)
        ev.has_param_norm = _has_finite(frame, "param_norm")
        if "skipped" in frame.columns:
            ev.scaler_skipped = bool(frame.loc[frame["step"] == onset, "skipped"].fillna(False).astype(bool).any())
        ev.param_reset = param_reset(inc, shared.frame, cfg) if ev.reset_level is not None else None
        inc.cause, inc.evidence = decide_cause(inc, ev, cfg)
        inc.cause_guessed = cause_guessed(inc, ev)
        inc.severity = severity(inc, cfg)
        if ev.loss_scale and ev.loss_scale["notable"]:
            s = ev.loss_scale
            inc.evidence.append(f"loss scale fell {fmt(s['from'])} -> {fmt(s['to'])} ({s['halvings']:.0f} halvings, "
                                f"{s['skipped']} skipped steps) around onset: fp16 overflow")
        inc.batches = ev.batches
        inc.layers = ev.layers.layers if ev.layers is not None else []
        inc.precursor_lead_steps = _lead(inc, loss_flag, ev)
        inc.recommendation = recommend(inc, ev, checkpoints=shared.checkpoints, clip=self.clip,
                                       peak_lr=shared.peak_lr_before(onset), first_step=shared.first_step, config=cfg)
        return {
            "segment": piece.segment,
            "loss_flag_step": loss_flag,
            "lr_at_onset": ev.lr_onset,
            "lr_jump": ev.lr_jump,
            "warmup": ev.warmup,
            "clipping": ev.clipping,
            "loss_scale": ev.loss_scale,
            "ranks": ev.ranks,
            "grad_precursor": ev.grad_precursor,
            "groups": ev.layers.groups if ev.layers is not None else [],
            "optimizer_precursors": ev.layers.precursors if ev.layers is not None else [],
            "layer_history_steps": ev.layers.history_steps if ev.layers is not None else 0,
            "update_without_grad": ev.update_step,
            "notes": ev.notes,
        }

    def _judge_aftermath(self, inc: Incident, shared: PieceData, ev: Evidence) -> None:
        """Verdict and lasting damage against the pre-incident trajectory; a loss back at its untrained level."""
        recovery = self.config.recovery or RecoveryConfig()
        span = (inc.onset_step - 3 * recovery.fit_steps, inc.end_step + recovery.horizon_steps)
        frame, judged = shared.window(*span), None
        if "loss" in frame.columns:
            healthy = shared.healthy_window(*span)
            judged = judge_recovery(frame["step"].to_numpy(), frame["loss"].to_numpy(np.float64), onset_step=inc.onset_step,
                                    end_step=inc.end_step, healthy=healthy, config=recovery)
        if judged is None:  # no loss before onset: the detector's band is all there is
            inc.verdict = "recovered" if inc.recovered else ("divergence" if inc.kind in ("nonfinite", "divergence") else "persistent")
            ev.notes.append("no finite loss before onset: recovery judged by the detector's band, not by a trajectory")
        else:
            inc.verdict, inc.damage = judged.verdict, judged.to_dict()
            if inc.kind == "divergence" and inc.verdict in ("recovered", "recovered_with_damage"):
                inc.verdict = "persistent"
            inc.recovered = inc.verdict == "recovered"
            inc.recovery_step = judged.back_step if inc.recovered else None
        ev.reset_level = reset_level(inc, frame, shared, ev, self.config)

    def _in_warmup(self, found: list[Incident], frame: pd.DataFrame) -> list[Incident]:
        """Drop grad-norm-only rises that start and end inside a visible LR warmup, with a warning.

        While the LR ramps up the gradient norm rises by design (a clean run of the spike suite
        doubles it over its 30 warmup steps), against a baseline of a handful of steps. The loss
        and non-finite values are still judged there.
        """
        w = warmup(frame)
        if not w or not w["visible"] or w["end_step"] is None:
            return found
        kept = []
        for inc in found:
            if inc.kind == "grad_spike" and inc.recovered and inc.end_step <= w["end_step"]:
                self.out.warnings.append(
                    f"grad norm rose {fmt(inc.peak_ratio, 2)}x during the LR warmup ({fmt_span(inc.onset_step, inc.end_step)}, "
                    f"warmup to step {w['end_step']}) and came back: expected while the LR ramps, not an incident"
                )
            else:
                kept.append(inc)
        return kept

    # ------------------------------------------------------------------------- data access

    def _healthy(self, frame: pd.DataFrame, detection: pd.DataFrame) -> np.ndarray:
        """Steps of `frame` whose loss the detector did not flag (those before the detection window too)."""
        if "loss" not in detection.columns:
            return np.ones(len(frame), dtype=bool)
        flags = flag_series(detection["step"].to_numpy(), detection["loss"].to_numpy(np.float64), self.detector)
        flagged = set(flags.loc[flags["flagged"], "step"].tolist())
        return ~frame["step"].isin(flagged).to_numpy()

    def _find_between_holes(self, detection: pd.DataFrame) -> list[Incident]:
        """Incidents of each stretch between holes, each judged against its own baseline: a loss
        after missing steps is compared with no history the run did not show."""
        steps = detection["step"].to_numpy()
        cuts = sorted({int(np.searchsorted(steps, s)) for s in self.after_holes if len(steps) and steps[0] < s <= steps[-1]})
        bounds = zip([0, *cuts], [*cuts, len(detection)])
        return [i for lo, hi in bounds if hi > lo for i in find_incidents(detection.iloc[lo:hi], self.detector)]

    def _detection_frame(self, frame: pd.DataFrame, own: pd.DataFrame) -> pd.DataFrame:
        # The detector's state spans `window` accepted values plus a held streak of at most
        # `persist_steps`; a longer ancestry changes nothing, so it is cut for speed.
        keep = 2 * (self.detector.window + self.detector.persist_steps)
        first_own = int(np.flatnonzero(frame["_own"].to_numpy())[0]) if len(own) else 0
        columns = [c for c in ("step", "loss", "grad_norm", "skipped") if c in frame.columns]
        return frame.iloc[max(0, first_own - keep):][columns]

    def _rows_of(self, frame: pd.DataFrame, *, window: tuple[int, int] | None = None) -> pd.DataFrame:
        """All ranks' step rows for the (segment, step) pairs of `frame` (optionally within a window)."""
        if window is not None:
            frame = frame.loc[(frame["step"] >= window[0]) & (frame["step"] <= window[1])]
        if not self.multi_rank:
            return frame
        keys = frame[["segment", "step"]].drop_duplicates()
        return self.steps.merge(keys, on=["segment", "step"], how="inner")

    def _layers(self, frame: pd.DataFrame, start: int, stop: int) -> pd.DataFrame:
        layers = self.run.layers(first_step=max(0, start), last_step=stop)
        if layers.empty:
            return layers
        if "rank" in layers.columns and layers["rank"].nunique() > 1:
            layers = layers.loc[layers["rank"] == layers["rank"].min()]
        keys = segment_ranges(frame.loc[(frame["step"] >= start) & (frame["step"] <= stop)])
        return in_ranges(layers, keys)

    def _moments_ratio(self, piece) -> float | None:
        if not self.run.has_layers:
            return None
        frame = self.lineage.frame(piece.index)
        span = 4 * self.layer_every
        layers = self._layers(frame, piece.first_step - span, piece.first_step + span)
        before = frame.loc[~frame["_own"], "step"]
        if before.empty or layers.empty:
            return None
        return moments_ratio(layers, before_step=int(before.iloc[-1]), after_step=piece.first_step)

    def _lineage_checkpoints(self, frame: pd.DataFrame) -> list[tuple[int, str | None, int | None]]:
        """(step, path, overwritten_at) of the lineage's checkpoints; `overwritten_at` is the step of the
        next event, on any segment, that wrote the same path (events are in the order they were written)."""
        if not self.checkpoints:
            return []
        ranges = segment_ranges(frame)
        out = []
        for i, (step, segment, path) in enumerate(self.checkpoints):
            lo_hi = ranges.get(segment)
            if lo_hi is not None and lo_hi[0] <= step <= lo_hi[1] + 1:
                later = next((s for s, _, p in self.checkpoints[i + 1 :] if path is not None and p == path), None)
                out.append((step, path, later))
        return out

    def _resume_findings(self, resumes) -> list[Finding]:
        explained = {(c["segment"]) for i, c in zip(self.out.incidents, self.out.context) if i.cause == "state_reset"}
        found = []
        for piece, resume, ratio in resumes:
            reset = resume.state_reset or (ratio is not None and ratio < 0.1)
            if not reset or piece.segment in explained:
                continue
            sentences = list(resume.evidence)
            if ratio is not None and ratio < 0.1:
                sentences.append(f"exp_avg_sq fell to {fmt(ratio, 2)}x across the resume: optimizer moments not restored")
            found.append(Finding(
                id="state_not_restored", severity="warning",
                message=f"resume at step {piece.first_step} (segment {piece.segment}): " + "; ".join(sentences),
                why="A resume must load the model, optimizer and scheduler state saved with the checkpoint; a loss back "
                "at its initial level (as seen in public Pythia runs) or fresh Adam moments mean it did not.",
                details={"segment": piece.segment, "step": piece.first_step, "moments_ratio": ratio},
            ))
        return found


# ----------------------------------------------------------------------------- helpers


def _lead(inc: Incident, loss_flag: int | None, ev: Evidence) -> int | None:
    """Steps from the earliest precursor (grad-norm flag, tensor departure) to the loss flag; 0 when
    the grad norm flagged with the loss, None when nothing preceded or accompanied it."""
    if loss_flag is None:
        return None
    steps = [ev.grad_precursor["step"]] if ev.grad_precursor else []
    if "grad_norm" in inc.series:
        steps.append(inc.series["grad_norm"]["onset_step"])
    if ev.layers is not None and ev.layers.earliest_step is not None:
        steps.append(ev.layers.earliest_step)
    grad = [s for s in steps if s <= loss_flag]
    return loss_flag - min(grad) if grad else None


def _jump_findings(jumps: list[dict[str, Any]]) -> list[Finding]:
    shown = _one_per_step([j for j in jumps if j["direction"] == "up" or j.get("at_resume") is not None])
    if not shown:
        return []
    parts = [
        f"step {j['step']}: {fmt(j['before'])} -> {fmt(j['after'])} ({fmt(j['factor'], 2)}x)"
        + (f", at the resume of segment {j['at_resume']}" if j.get("at_resume") is not None else "")
        for j in shown[:5]
    ]
    return [Finding(
        id="lr_discontinuity", severity="warning",
        message=f"the LR series jumps at {steps_text(len(shown))}: " + "; ".join(parts),
        why="A schedule changes the LR smoothly; a jump (most often a resume that did not restore the scheduler's "
        "step) changes the step size the optimizer's state was tuned to, and an upward jump is a known spike cause.",
        details={"jumps": shown},
    )]


def _one_per_step(jumps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per discontinuity: the param groups that jumped at the same step are listed in its `groups`."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for j in jumps:
        key = (j["step"], j["direction"])
        if key in out:
            out[key]["groups"].append(j["group"])
        else:
            out[key] = {**j, "groups": [j["group"]]}
    return list(out.values())
