"""One analysis pass over a run: per lineage, find incidents (detector, LR jumps, change points), then diagnose each."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._meta import gradient_weight_decay, parameter_modules, second_moment_decay, watch_config
from spikedoc.analysis._per_incident import IncidentDiagnosis, one_per_step
from spikedoc.analysis._robust import fmt, fmt_span, fmt_steps, steps_text
from spikedoc.analysis._rundata import PieceData, checkpoints_of, clip_in_use, has_finite, in_ranges, score, segment_ranges
from spikedoc.analysis.attribution import batch_profile, hash_history
from spikedoc.analysis.batches import repeated_in_a_row
from spikedoc.analysis.change_points import (anomalous_batches, change_point_incidents, state_jumps, trajectory_departures,
                                             weight_returns)
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.context import lr_discontinuities, warmup
from spikedoc.analysis.detect import DetectorConfig, find_incidents, flag_series
from spikedoc.analysis.guard_actions import withheld_steps, without_guard_lr_changes
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.lineage import Lineage, check_resume, moments_ratio
from spikedoc.analysis.lints import Finding, lint
from spikedoc.analysis.lr_response import lr_jump_incidents, untested_jumps
from spikedoc.analysis.schedule import restart_path, restarted_at_resume, scheduled_restarts
from spikedoc.analysis.stretches import stretch_incidents
from spikedoc.analysis.state_writes import STATE_BOUND_COLUMNS, describe, state_writes, written_steps

__all__ = ["AnalysisPass"]

# Largest layer table (uncompressed, all columns) held to the optimizer-state bounds run-wide: a 0.34 GB
# table of 6M rows (20,000 steps x 300 tensors) took 9.4 s of CPU on the 2-core benchmark machine, so 1 GB
# is about half a minute; larger runs have the bounds checked in each incident's window only.
_STATE_SCAN_BYTES = 1_000_000_000
# Steps with a broken bound beyond which the bounds are taken not to apply to the run's optimizer: more
# than 3 and more than 1% of its steps (a write is an event: 1 step in each exam run that has one).
_MOST_WRITES, _MOST_WRITE_SHARE = 3, 0.01


class AnalysisPass(IncidentDiagnosis):
    """One analysis pass; holds what the per-incident steps share."""

    def __init__(self, run, steps, lineage: Lineage, config: AnalysisConfig, out: Any) -> None:  # out: the `Diagnosis` it fills
        self.run, self.steps, self.lineage, self.config, self.out = run, steps, lineage, config, out
        self.detector = config.detector if config.detector is not None else DetectorConfig()
        self.meta = run.meta or {}
        self.multi_rank = "rank" in steps.columns and steps["rank"].nunique() > 1
        self.run_profile = batch_profile(steps)
        self.profile = self.run_profile
        self.module_types = parameter_modules(self.meta)
        self.gradient_decay = gradient_weight_decay(self.meta)
        self.v_decay = second_moment_decay(self.meta)
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
            if not has_finite(self.steps, column) and column not in out.missing:
                out.missing.append(column)
        if "loss" in out.missing:
            out.warnings.append(
                "no finite loss recorded: incidents are found on the grad norm alone, and nothing is said about the "
                "loss (its spikes, divergence, recovery, resumes); record it with monitor.record(loss=loss)"
            )
        resumes, jumps_found, restarts, state_changes = [], [], [], []
        writes = self._state_writes(lineage.final())
        for piece in lineage.pieces:
            frame = lineage.frame(piece.index)
            own = frame.loc[frame["_own"]]
            resume = check_resume(lineage, piece.index, config=self.config)
            ratio = self._moments_ratio(piece) if piece.resumed else None
            if resume is not None:
                resumes.append((piece, resume, ratio))
            starts = {p.first_step: p.segment for p in lineage.pieces if p.resumed and p.index <= piece.index}
            # A schedule restarted at a resume is read whole (its fall, then the warmup climbing back), in
            # place of the step test's reading of its first step alone (a fall, where the warmup is long).
            restarted = restarted_at_resume(frame, starts)
            again = {(j["step"], j["group"]) for j in restarted}
            jumps = [j for j in lr_discontinuities(frame, config=self.config) if (j["step"], j["group"]) not in again]
            jumps += restarted
            jumps = without_guard_lr_changes(sorted(jumps, key=lambda j: (j["step"], j["group"])), out.guard_actions)
            jumps = [j for j in jumps if j["step"] not in self.after_holes]
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
            points += [{"step": j["step"], "why": "lr", "until": j.get("until")}
                       for j in untested_jumps(detection, jumps, self.detector, self.config)]
            changed = [s for s in state_jumps(frame, self.config) if s in own_steps and s not in starts]
            # A moment beyond its optimizer's exact bound: the state was written (dated to the first step it can be).
            written = {s for s in written_steps(writes) if s in own_steps and s not in starts}
            points += [{"step": s, "why": "optimizer state", "certain": s in written} for s in sorted({*changed, *written})]
            points += [{"step": s, "why": "batch", "one_step": True}
                       for s in anomalous_batches(self._rows_of(own), self.run_profile, self.config)]
            # Last, so that a change found independently of the loss at the same step names it.
            points += [{"step": s, "why": "loss", "one_step": True}
                       for s in trajectory_departures(frame, self.config, self.detector)]
            found += change_point_incidents(frame, [p for p in points if p["step"] in own_steps], found, self.config,
                                            threshold=self.detector.threshold, merge_gap=self.detector.merge_gap)
            if not self.multi_rank:  # last: a stretch's flanks must be clear of every other change
                found += stretch_incidents(frame, self.run_profile, found, self.config, threshold=self.detector.threshold)
            found = sorted((i for i in found if i.onset_step in own_steps), key=lambda i: (i.onset_step, i.kind))
            self.profile = self._profile_before(frame, found)
            found = self._one_per_stretch(found, frame)
            state_changes += [s for s in changed if not any(i.onset_step - 2 <= s <= i.end_step + 2 for i in found)]
            shared = PieceData(frame, hash_history(self._rows_of(frame)) if found else {},
                               self._lineage_checkpoints(frame) if found else [],
                               healthy=self._healthy(frame, detection) if found else None,
                               first_up_jump=min(ups) if ups else None,
                               piece=piece, incidents=found, jumps=jumps, resume=resume, moments_ratio=ratio,
                               state_jumps=changed)
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
        out.findings += _state_change_findings(state_changes)
        out.findings += self._state_write_findings(writes)
        out.findings += _repeat_findings(repeated_in_a_row(self.steps, withheld_steps(out.guard_actions)), self.multi_rank)
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
        detection = frame.iloc[max(0, first_own - keep):]
        withheld = withheld_steps(self.out.guard_actions)
        if withheld and "skipped" in columns and "segment" in detection.columns:
            # A guard's veto or replay step is recorded as a skip; it is not a loss scaler's overflow
            # probe, and its non-finite gradient norm is a fault (`find_incidents` keeps it).
            by_guard = [(int(g), int(s)) in withheld for g, s in zip(detection["segment"], detection["step"])]
            detection = detection.assign(skipped=detection["skipped"].astype("boolean").fillna(False) & ~np.array(by_guard))
        return detection[columns]

    def _rows_of(self, frame: pd.DataFrame, *, window: tuple[int, int] | None = None) -> pd.DataFrame:
        """All ranks' step rows for the (segment, step) pairs of `frame` (optionally within a window)."""
        if window is not None:
            frame = frame.loc[(frame["step"] >= window[0]) & (frame["step"] <= window[1])]
        if not self.multi_rank:
            return frame
        keys = frame[["segment", "step"]].drop_duplicates()
        return self.steps.merge(keys, on=["segment", "step"], how="inner")

    def _layers(self, frame: pd.DataFrame, start: int, stop: int, columns: tuple[str, ...] | None = None) -> pd.DataFrame:
        layers = self.run.layers(first_step=max(0, start), last_step=stop, columns=columns)
        if layers.empty:
            return layers
        if "rank" in layers.columns and layers["rank"].nunique() > 1:
            layers = layers.loc[layers["rank"] == layers["rank"].min()]
        keys = segment_ranges(frame.loc[(frame["step"] >= start) & (frame["step"] <= stop)])
        return in_ranges(layers, keys)

    def _state_writes(self, final: pd.DataFrame) -> list[dict[str, Any]]:
        """The lineage's optimizer state held to its exact bounds (`state_writes`), run-wide."""
        v_decay = self.v_decay
        if not self.run.has_layers or final.empty or not (self.gradient_decay or v_decay):
            return []
        if self.run.layer_bytes > _STATE_SCAN_BYTES:
            self.out.warnings.append(
                f"optimizer state not held to its bounds over the whole run: its layer table ({self.run.layer_bytes / 1e9:.1f} GB "
                f"uncompressed) is larger than the {_STATE_SCAN_BYTES / 1e9:.0f} GB read for it; each incident's window was")
            return []
        writes = state_writes(lambda lo, hi: self._layers(final, lo, hi, columns=STATE_BOUND_COLUMNS),
                              int(final["step"].min()), int(final["step"].max()), self.gradient_decay, v_decay)
        steps = written_steps(writes)
        if len(steps) > max(_MOST_WRITES, _MOST_WRITE_SHARE * len(final)):
            # A write is an event; a bound broken all along says the optimizer does not follow the rule
            # assumed for its class (a custom step under a stock name, statistics from elsewhere).
            self.out.warnings.append(
                f"optimizer state not held to its bounds: they broke at {len(steps)} of {len(final)} steps, so this "
                "optimizer does not update its moments as its class's rule says (a custom step?)")
            return []
        return writes

    def _state_write_findings(self, writes: list[dict[str, Any]]) -> list[Finding]:
        """Optimizer state written from outside the optimizer (`state_writes`) that no incident names."""
        reported = _reported_writes(self.out.context)
        # A state reset (weights and state set back) is its incident's story already.
        resets = [(i.onset_step - 2, i.end_step) for i in self.out.incidents if i.cause == "state_reset"]
        writes = [w for w in writes if (w["name"], w["step"]) not in reported
                  and not any(lo <= w["step"] <= hi for lo, hi in resets)]
        if not writes:
            return []
        return [Finding(
            id="optimizer_state_written", severity="warning",
            message=f"the optimizer state was written from outside the optimizer: {describe(writes)}",
            why="Each update moves a first moment by at most the gradient it adds and shrinks Adam's second moment by "
            "at most beta2, so a moment beyond those bounds was set by something else: a checkpoint converter, a state "
            "loaded from another run, a bug in a custom step. Every later update reads it, and the held-out loss can pay "
            "long after; find what wrote it.",
            details={"writes": writes[:50], "count": len(writes)},
        )]

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




def _reported_writes(context: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(tensor, measured step) of the state writes incidents already name as precursors."""
    return {(p["name"], int(p.get("seen", p["step"]))) for ctx in context for p in ctx.get("optimizer_precursors") or []
            if p.get("overwritten") and p.get("step") is not None}


def _repeat_findings(stretches: list[dict[str, Any]], multi_rank: bool) -> list[Finding]:
    """Batches fed at consecutive steps (`repeated_in_a_row`): a loader stuck on one batch."""
    if not stretches:
        return []
    parts = [f"steps {s['first_step']}..{s['last_step']} ({s['steps']} steps" + (f", rank {s['rank']}" if multi_rank else "")
             + f", batch_hash {s['batch_hash']})" for s in stretches[:3]]
    more = f" and {len(stretches) - 3} more" if len(stretches) > 3 else ""
    return [Finding(
        id="batch_repeated", severity="warning",
        message="the same batch was fed at consecutive steps: " + "; ".join(parts) + more,
        why="A data loader hands out a new batch each step; one batch step after step is a loader stuck on it (an "
        "iterator re-created each step, an index that stopped advancing). The model memorises it, its loss falls, "
        "and the run pays when new data returns; skip those steps' batches on a rerun. Data echoing on purpose "
        "repeats batches too: then this is expected.",
        details={"stretches": stretches[:50], "count": len(stretches)},
    )]


def _state_change_findings(steps: list[int]) -> list[Finding]:
    """Optimizer-state changes (`state_jumps`) that no incident explains: the loss did not leave its trajectory."""
    if not steps:
        return []
    return [Finding(
        id="optimizer_state_changed", severity="warning",
        message=f"the update per unit LR jumped at step{'s' if len(steps) > 1 else ''} {fmt_steps(steps, 5)} with no "
        "jump of the gradient norm, and the loss did not leave its trajectory: the optimizer's state changed under "
        "the run (zeroed or rescaled moments, a state dropped or loaded from elsewhere?)",
        why="An optimizer's update follows its gradient and the moments that gradient built; the update jumping alone "
        "is the state changing, which a lossy converter, a partial resume or a bug can do without the loss showing it "
        "at once (the held-out loss may still be worse).",
        details={"steps": steps},
    )]


def _jump_findings(jumps: list[dict[str, Any]]) -> list[Finding]:
    shown = one_per_step([j for j in jumps if j["direction"] == "up" or j.get("at_resume") is not None])
    if not shown:
        return []
    parts = [
        (f"step {j['step']}, the resume of segment {j['at_resume']}: the LR {restart_path(j)} (the LR of the run's "
         f"first {j['retraced']} steps again: the schedule started over)" if j.get("retraced") else
         f"step {j['step']}: {fmt(j['before'])} -> {fmt(j['after'])} ({fmt(j['factor'], 2)}x)"
         + (f", at the resume of segment {j['at_resume']}" if j.get("at_resume") is not None else ""))
        for j in shown[:5]
    ]
    return [Finding(
        id="lr_discontinuity", severity="warning",
        message=f"the LR series jumps at {steps_text(len(shown))}: " + "; ".join(parts),
        why="A schedule changes the LR smoothly; a jump (most often a resume that did not restore the scheduler's "
        "step) changes the step size the optimizer's state was tuned to, and an upward jump is a known spike cause.",
        details={"jumps": shown},
    )]

