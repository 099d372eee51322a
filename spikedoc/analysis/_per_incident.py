"""Diagnosing one incident: its evidence (batches, tensors, context, onset), aftermath, cause and advice."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.analysis._robust import fmt
from spikedoc.analysis._rundata import PieceData, has_finite
from spikedoc.analysis.advice import recommend
from spikedoc.analysis.attribution import attribute_batches, attribute_layers, batch_profile
from spikedoc.analysis.batches import date_positions, high_entropy_stretch
from spikedoc.analysis.causes import cause_guessed, decide_cause, severity
from spikedoc.analysis.context import clipping_before, loss_scale_drops, lr_at, rank_divergence, update_without_grad
from spikedoc.analysis.evidence import Evidence
from spikedoc.analysis.guard_actions import withheld_steps
from spikedoc.analysis.incident import Incident, joined
from spikedoc.analysis.onset import build_up, first_nonfinite, grad_precursor, one_step, param_reset, reset_level
from spikedoc.analysis.recovery import RecoveryConfig, judge_recovery

__all__ = ["IncidentDiagnosis", "one_per_step"]

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


class IncidentDiagnosis:
    """The per-incident half of `_pass.AnalysisPass` (which holds the run, its config and data access)."""

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

    def _entropy_stretch(self, ev: Evidence, frame: pd.DataFrame, onset: int, end: int,
                         stretch: dict[str, Any] | None = None) -> None:
        """Batches over the incident whose distinct-token ratios are together far above the run's
        (`high_entropy_stretch`; or `stretch`, the loss's and the batches' evidence of a stretch that
        `stretches.stretch_incidents` found): the onset batch gets the anomaly, the rest are its stretch."""
        first, last = (onset, min(end, onset + self.config.lookback)) if stretch is None else (onset, stretch["steps"][-1])
        rows = frame.loc[(frame["step"] >= first) & (frame["step"] <= last)]
        batches = attribute_batches(self._rows_of(rows), profile=self.profile, hashes={}, config=self.config)
        found = high_entropy_stretch(batches, self.profile, self.config) if stretch is None else _stretch_found(batches, stretch, self.run_profile)
        if found is None:
            return
        steps = found["steps"]
        if len(steps) > 1:
            what, they, their = f"the {len(steps)} batches of steps {steps[0]}..{steps[-1]} averages", "together they are", "their"
        else:
            what, they, their = f"the batch of step {steps[0]} is", "it is", "its"
        if stretch is None:
            why = f"no batch alone is far off, {they} {fmt(found['z'], 2)} sigma above it (noisy or partly garbled data)"
        else:
            why = (f"{they} {fmt(found['z'], 2)} sigma above it, while {their} loss sat {fmt(stretch['z'], 2)} standard "
                   "errors above the steps around, up at once and down at once: noisy or partly garbled data")
        batches[0]["anomalies"].append(
            f"the distinct-token ratio of {what} {fmt(found['mean'], 2)}, "
            f"{fmt(found['mean'] / found['median'], 2)}x the run's median ({fmt(found['median'], 2)}): {why}")
        for b in batches:
            b["flags"].append("high_distinct_token_ratio_stretch" if stretch is None else "noisy_stretch")
        ev.batches = [b for b in ev.batches if b["step"] != onset] + batches[:1]
        ev.stretch = batches[1:]

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
        if not self.multi_rank and not any(b["anomalies"] for b in ev.batches):
            # To the loss's own end: the loss is measured before the update, so the batches of a stretch of
            # bad data are those whose loss was high, not the later ones of a gradient norm still settling.
            last = loss_series["end_step"] if loss_series else end
            self._entropy_stretch(ev, frame, onset, last, (loss_series or {}).get("stretch"))
        date_positions(ev.batches + ev.stretch, shared.positions_restarted)
        if self.run.has_layers:
            # A few steps past the peak: state statistics that skipped the onset (a cost budget's light
            # steps, `layer_every`) come at the first step that has them again.
            ahead = peak + max(_STATE_LOOKAHEAD, self.layer_every)
            layer_frame = shared.window(onset - _CONTEXT * cfg.lookback, max(end, ahead))
            layers = self._layers(layer_frame, onset - cfg.lookback - max(cfg.layer_history, 32 * self.layer_every), ahead)
            ev.layers = attribute_layers(layers, onset=onset, peak=peak, reference=reference,
                                         module_types=self.module_types, config=cfg, gradient_decay=self.gradient_decay,
                                         v_decay=self.v_decay)
        ev.grad_precursor = grad_precursor(inc, loss_flag, shared.incidents, cfg)
        ups = [j for j in shared.jumps if j["direction"] == "up" and onset - cfg.lookback <= j["step"] <= onset]
        # The latest jump, as one discontinuity of every param group that jumped at that step.
        ev.lr_jump = one_per_step([j for j in ups if j["step"] == ups[-1]["step"]])[0] if ups else None
        ev.lr_onset = lr_at(frame, onset)
        ev.warmup = shared.warmup
        ev.clipping = clipping_before(frame, onset, config=cfg)
        ev.loss_scale = loss_scale_drops(frame, onset - cfg.lookback, end)
        if self.multi_rank:
            ev.ranks = rank_divergence(self._rows_of(frame, window=(onset - 3 * cfg.lookback, end)),
                                       onset, end, config=cfg)
        if shared.resume is not None and piece.first_step <= onset <= piece.first_step + cfg.lookback:
            ev.resume, ev.moments_ratio = shared.resume, shared.moments_ratio
        ev.update_step = update_without_grad(frame, onset, peak, config=cfg, before=_CANDIDATES)
        ev.state_jump = next((s for s in shared.state_jumps if onset - _CANDIDATES <= s <= onset), None)
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
            if series.get("change") == "loss":
                ev.notes.append(
                    f"found by the trajectory's second look: the {name} was {fmt(series['shift_z'], 2)} sigmas above the "
                    "trajectory of the steps before it, while the detector's band, whose window still holds the loss's own "
                    "fall, was wider than that")
        if inc.low_confidence:
            ev.notes.append("too little history before onset for a confident baseline: treat the size with care")

        self._judge_aftermath(inc, shared, ev)
        ev.minor = severity(inc, cfg) == "minor"
        ev.first_nonfinite = first_nonfinite(inc, frame, ev.layers)
        ev.build_up = build_up(inc, ev, ev.first_nonfinite["step"] if ev.first_nonfinite else reference, cfg)
        ev.has_param_norm = has_finite(frame, "param_norm")
        if "skipped" in frame.columns and not self._withheld(onset, piece.segment):  # the guard's skip, not a scaler's
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
        unrecovered = next((i for i in shared.incidents if _left_state_behind(i, onset)), None)
        inc.recommendation = recommend(inc, ev, checkpoints=shared.checkpoints, clip=self.clip,
                                       peak_lr=shared.peak_lr_before(onset), first_step=shared.first_step, config=cfg,
                                       unrecovered=unrecovered)
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

    def _withheld(self, step: int, segment: int) -> bool:
        """A guard vetoed or replayed `step` of `segment`: it withheld the update (recorded as skipped)."""
        return (segment, step) in withheld_steps(self.out.guard_actions)

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

def _stretch_found(batches: list[dict[str, Any]], stretch: dict[str, Any], profile: Any) -> dict[str, Any] | None:
    """`high_entropy_stretch`'s summary of a stretch found with its loss (`stretches.stretch_incidents`)."""
    values = [b["stats"].get("distinct_token_ratio") for b in batches]
    stat = profile.stats.get("distinct_token_ratio")
    if stat is None or not batches or any(v is None for v in values):
        return None
    return {"steps": [b["step"] for b in batches], "z": stretch["batch_z"], "mean": float(np.mean(values)), "median": stat[0]}


def _left_state_behind(earlier: Incident, onset: int) -> bool:
    """An incident diagnosed before (incidents are diagnosed in step order) that left the state a later
    one at `onset` grew from: it advised a rollback, and reset the state or had its loss still off its
    trajectory when the later one began (one back on it by then, judged bad only through what came
    after, left nothing behind)."""
    rec = earlier.recommendation or {}
    if earlier.onset_step >= onset or not rec.get("rollback") or rec.get("rollback_to_step") is None:
        return False
    back = (earlier.damage or {}).get("back_step")
    return earlier.cause == "state_reset" or back is None or back >= onset


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



def one_per_step(jumps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per discontinuity: the param groups that jumped at the same step are listed in its `groups`."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for j in jumps:
        key = (j["step"], j["direction"])
        if key in out:
            out[key]["groups"].append(j["group"])
        else:
            out[key] = {**j, "groups": [j["group"]]}
    return list(out.values())

