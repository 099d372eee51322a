"""The guard's judgement of each step: veto it or not, open and follow an incident, decide a rollback.

Decisions are data with their evidence (`Verdict`, `Decision`); the guard acts on them and records
them. The band is the analysis's own `StreamingDetector` (the loss, and the gradient norm in log
scale; under data parallelism each rank's own loss too: `rank_bands`) and the damage judgement
is the analysis's `RecoveryTracker`, so the guard acts on what `spikedoc analyze` would report,
computed online.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from spikedoc.detector.streaming import DetectorConfig, Flag, StreamingDetector
from spikedoc.analysis.recovery import RecoveryConfig, RecoveryTracker
from spikedoc.guard.agree import StepValues
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.rank_bands import RankBands, leading

__all__ = ["Verdict", "Decision", "Judge"]

_STATE_FORMAT = 1


class Verdict(NamedTuple):
    """The judgement of one step before its update (a named tuple: one is built per step)."""

    step: int
    loss: float
    grad_norm: float
    veto: bool
    reasons: tuple[str, ...]
    """Why it was vetoed: `nonfinite` (the loss or gradient norm on some rank), `loss_out_of_band`,
    `grad_norm_out_of_band`, `optimizer_state_collapsed` (`moments.py`), `rollback_requested`."""
    loss_z: float
    """The largest departure of the mean loss's band and, under data parallelism, each rank's own."""
    grad_z: float
    loss_flagged: bool
    """Out of the detector's band (its threshold, below the veto's) on a warm baseline (the mean's
    or some rank's own)."""
    grad_flagged: bool
    rollback_requested: bool = False
    rank_losses: tuple[float, ...] = ()
    """Each rank's own loss (`StepValues.rank_losses`); empty in one process."""
    loss_rank: int | None = None
    """The rank whose own band gave `loss_z`; None when the mean's did (or in one process)."""

    def evidence(self) -> dict[str, Any]:
        """Plain-typed fields for an event."""
        ranks = {"rank_losses": list(self.rank_losses), "loss_rank": self.loss_rank} if self.rank_losses else {}
        return {"loss": self.loss, "grad_norm": self.grad_norm, "loss_z": self.loss_z, "grad_norm_z": self.grad_z,
                "reasons": list(self.reasons), **ranks}  # fmt: skip


@dataclass(kw_only=True)
class Decision:
    """A rollback the judgement calls for, with what it rests on."""

    reason: str
    """`vetoes` (many in a row), `requested`, `optimizer_state` (its second moments collapsed), or
    the recovery verdict: `persistent`, `divergence`, `recovered_with_damage`."""
    onset_step: int
    precursor_step: int
    """Earliest step whose update may have caused the damage (the step before onset, or an earlier
    gradient-norm flag or LR jump): the rollback goes to a checkpoint at or before it."""
    cause: str
    """`lr_schedule` (an upward LR jump in the lookback), `optimizer_state` (its second moments
    collapsed, seen before the update) or `damage` (anything else)."""
    attributed_steps: list[int] = field(default_factory=list)
    """Steps whose batches are blamed (the onset and vetoed steps of the incident)."""
    lr_jump: dict[str, Any] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


class _Flags(NamedTuple):
    """The bands' assessments of one step: the mean loss's, the gradient norm's, each rank's loss's."""

    loss: Flag | None
    grad: Flag | None
    ranks: list[Flag | None]


@dataclass(kw_only=True)
class _Incident:
    onset_step: int
    precursor_step: int
    attributed_steps: list[int]
    tracker: RecoveryTracker | None
    lr_jump: dict[str, Any] | None = None
    """The unscheduled LR jump that opened the incident (with `lrs_before`), if one did."""


class Judge:
    """Streaming band on the loss and gradient norm, the veto rule, and incident tracking.

    Example:
        >>> judge = Judge(GuardConfig())
        >>> for s in range(100):
        ...     v = judge.judge(s, StepValues(3.0 + 0.01 * (s % 5), 0.5, 0, 0)); judge.record(v)
        >>> judge.judge(100, StepValues(30.0, 0.5, 0, 0)).veto
        True
    """

    def __init__(self, config: GuardConfig, *, detector: DetectorConfig | None = None,
                 recovery: RecoveryConfig | None = None) -> None:  # fmt: skip
        self.config = config
        self.detector_config = detector or DetectorConfig()
        self.recovery_config = recovery or RecoveryConfig()
        self.loss_detector = StreamingDetector(self.detector_config)
        self.grad_detector = StreamingDetector(self.detector_config, log_scale=self.detector_config.grad_norm_log_scale)
        self.rank_bands = RankBands(self.detector_config)
        """Each rank's own loss band (under data parallelism; none in one process)."""
        self.healthy: deque[tuple[int, float]] = deque(maxlen=self.recovery_config.fit_steps)
        """The last healthy (finite, in band, applied) steps and losses: the trajectory's history."""
        self.grad_flags: deque[int] = deque(maxlen=64)
        """Recent applied steps whose gradient norm was out of band (precursors)."""
        self.lrs: deque[tuple[int, list[float]]] = deque(maxlen=config.lookback + 2)
        self.lr_peaks: list[float] = []
        """Each group's highest applied LR so far: a declared warm restart goes back to it."""
        self.schedule: dict[str, Any] | None = None
        """`start_step` and `scheduler` (as in meta.json) of the scheduler in use: its warm restarts are no LR jump."""
        self.vetoes_in_row = 0
        self.recent_vetoes: deque[int] = deque(maxlen=config.max_vetoes_in_row)
        """The last vetoed steps: vetoes piling up (not in a row) open an incident."""
        self.incident: _Incident | None = None
        self._judged: tuple[Verdict, _Flags] | None = None
        """The last judgement and the bands' assessments it rests on (until `record`)."""

    # ----------------------------------------------------------------------------- per step

    def judge(self, step: int, values: StepValues) -> Verdict:
        """Judge one step against the band before its update; nothing is learnt until `record` (a
        judgement not recorded is simply replaced by the next one)."""
        cfg = self.config
        lf = self.loss_detector.assess(step, values.loss) if math.isfinite(values.loss) else None
        gf = self.grad_detector.assess(step, values.grad_norm) if math.isfinite(values.grad_norm) else None
        # One rank's bad batch is judged by its own loss, as on one machine: the mean would dilute it.
        ranks = self.rank_bands.assess(step, values.rank_losses)
        losses = [lf, *ranks]
        lead = leading(losses)
        reasons = []
        if values.nonfinite_ranks:
            reasons.append("nonfinite")
        if values.collapsed_moments:  # the state is broken whatever the loss says: its update would be huge
            reasons.append("optimizer_state_collapsed")
        if any(_beyond(f, cfg.veto_sigma) for f in losses):
            reasons.append("loss_out_of_band")
        loss_flagged = any(f is not None and f.flagged and f.warm for f in losses)
        # The gradient norm alone is a weaker witness than the loss (healthy steps reach 8-12 sigmas
        # of it with an ordinary loss): it vetoes at `grad_veto_sigma`, or at `veto_sigma` when the
        # loss is out of the detector's band too.
        if _beyond(gf, cfg.grad_veto_sigma) or (loss_flagged and _beyond(gf, cfg.veto_sigma)):
            reasons.append("grad_norm_out_of_band")
        requested = values.rollback_requests > 0
        verdict = Verdict(step=step, loss=values.loss, grad_norm=values.grad_norm, veto=cfg.veto and bool(reasons),
                          reasons=tuple(reasons), loss_z=_z(lead if lead is not None else lf), grad_z=_z(gf),
                          loss_flagged=loss_flagged,
                          grad_flagged=bool(gf is not None and gf.flagged and gf.warm),
                          rollback_requested=requested, rank_losses=values.rank_losses,
                          loss_rank=ranks.index(lead) if lead is not None and lead is not lf else None)  # fmt: skip
        self._judged = (verdict, _Flags(lf, gf, ranks))
        return verdict

    def record(self, verdict: Verdict, *, lrs: list[float] | None = None) -> Decision | None:
        """Learn from a judged step (applied or vetoed) and say whether to roll back now."""
        step = verdict.step
        if lrs is not None:
            self.lrs.append((step, lrs))
        if self._judged is None or self._judged[0] is not verdict:  # not the last judgement: assess it again
            self.judge(step, StepValues(verdict.loss, verdict.grad_norm, 0, 0, verdict.rank_losses))
        judged, self._judged = self._judged, None
        if verdict.veto:  # the bands never learn a vetoed step
            self.vetoes_in_row += 1
            self.recent_vetoes.append(step)
        else:
            self.vetoes_in_row = 0
            self._learn(verdict, judged[1])
        jump = self._new_lr_jump(step, judged[1].loss) if lrs is not None else None
        if self.incident is None and jump is not None:
            self._open(step, lr_jump=jump)
        elif self.incident is None and verdict.loss_flagged and not verdict.veto:
            self._open(step)
        elif self.incident is None and verdict.veto and self._vetoes_pile_up():
            self._open(self.recent_vetoes[0], attributed=list(self.recent_vetoes))
        decision = None
        if "optimizer_state_collapsed" in verdict.reasons:
            # Sound at the step before's judgement: its checkpoint (taken before it) is the target.
            decision = Decision(reason="optimizer_state", onset_step=step, precursor_step=max(0, step - 1),
                                cause="optimizer_state")  # fmt: skip
        elif verdict.rollback_requested:
            decision = self._decision("requested", step)
        elif self.vetoes_in_row >= self.config.max_vetoes_in_row:
            decision = self._decision("vetoes", step - self.vetoes_in_row + 1)
        if verdict.veto and self.incident is not None and step not in self.incident.attributed_steps:
            self.incident.attributed_steps.append(step)
        if self.incident is not None and self.incident.tracker is not None:
            state = self.incident.tracker.update(step, verdict.loss)
            if decision is None and state.decided and not self._awaits_shift_test(state.verdict):
                if state.verdict in ("recovered", "pending"):
                    self.incident = None
                else:
                    decision = self._decision(state.verdict, self.incident.onset_step,
                                              evidence={"excess_ratio": state.excess_ratio,
                                                        "excess_sigma": state.excess_sigma})  # fmt: skip
        return decision

    def clipped_share(self, clip: float | None) -> tuple[float, int]:
        """Share of the gradient-norm band's steps (healthy, applied) whose norm was at or above
        `clip`, i.e. clipped; and how many steps that is."""
        norms = self.grad_detector.window()
        if clip is None or not norms:
            return 0.0, len(norms)
        return sum(n >= clip for n in norms) / len(norms), len(norms)

    def forget_vetoes(self) -> None:
        """The vetoes so far were the data's fault: no incident, nothing piling up."""
        self.vetoes_in_row = 0
        self.recent_vetoes.clear()
        self.incident = None

    # ------------------------------------------------------------------------------ internals

    def _learn(self, verdict: Verdict, flags: _Flags) -> None:
        # The bands learn the step as they assessed it; what the judgement keeps besides follows their flags.
        loss_flag, grad_flag = flags.loss, flags.grad
        if loss_flag is not None:
            self.loss_detector.learn(loss_flag)
        if grad_flag is not None:
            self.grad_detector.learn(grad_flag)
        self.rank_bands.learn(flags.ranks)
        in_band = loss_flag is not None and not any(f is not None and f.flagged for f in (loss_flag, *flags.ranks))
        if in_band and self.incident is None:
            self.healthy.append((verdict.step, verdict.loss))
        if grad_flag is not None and grad_flag.flagged and grad_flag.warm:
            self.grad_flags.append(verdict.step)

    def _awaits_shift_test(self, verdict: str) -> bool:
        """An LR jump's aftermath is back on the trajectory, but too few steps since hold the
        lasting-shift test: a surge leaves the loss at a slightly higher level rather than a spike,
        so `recovered` is taken only once that test could say `recovered_with_damage`."""
        incident = self.incident
        return (verdict == "recovered" and incident is not None and incident.lr_jump is not None
                and incident.tracker is not None and incident.tracker.shift_steps < self.recovery_config.hold_steps)  # fmt: skip

    def _vetoes_pile_up(self) -> bool:
        # As many vetoes as `max_vetoes_in_row`, not in a row but within 4x as many steps.
        n = self.config.max_vetoes_in_row
        return len(self.recent_vetoes) == n and self.recent_vetoes[-1] - self.recent_vetoes[0] < 4 * n

    def _precursor(self, onset: int) -> int:
        """Earliest step whose update may have caused an incident first seen at `onset`: the step
        before it (the loss of step t shows the update of step t - 1), or an earlier gradient-norm
        flag within the lookback (a large update at that step)."""
        flags = [s for s in self.grad_flags if onset - self.config.lookback <= s <= onset]
        return max(0, min([onset - 1, *flags]))

    def _open(self, onset: int, *, attributed: list[int] | None = None, lr_jump: dict[str, Any] | None = None) -> None:
        steps, losses = [s for s, _ in self.healthy], [v for _, v in self.healthy]
        tracker = RecoveryTracker(onset, steps, losses, config=self.recovery_config)
        if tracker.usable:  # no finite history: nothing to judge recovery against (cannot happen once warm)
            # A jump's own update is the first it touched (a loss shows the update of the step before it).
            precursor = self._precursor(onset + 1 if lr_jump is not None else onset)
            self.incident = _Incident(onset_step=onset, precursor_step=precursor,
                                      attributed_steps=attributed or [onset], tracker=tracker, lr_jump=lr_jump)

    def _new_lr_jump(self, step: int, loss_flag: Flag | None) -> dict[str, Any] | None:
        """An unscheduled upward LR jump at `step` (just recorded in `lrs`): some group's LR at least
        `lr_jump_factor` times its LR at the step before, on a warm band (a warmup's first steps are
        no jump), and not a declared warm restart. A jump from an LR of 0 has no factor: not one."""
        rows = list(self.lrs)
        now, before = rows[-1], rows[-2] if len(rows) > 1 and rows[-2][0] < step else None
        peaks = self.lr_peaks
        self.lr_peaks = [max(p, v) if math.isfinite(v) else p for p, v in zip(peaks, now[1])] + list(now[1][len(peaks):])
        if before is None or loss_flag is None or not loss_flag.warm:
            return None
        # The guard's own upward change (undoing a rollback's factor) is 1 / lr_factor: never a jump.
        factor = max(self.config.lr_jump_factor, 1.5 / self.config.lr_factor)
        jumps = [{"step": step, "group": g, "before": b, "after": a, "factor": a / b, "direction": "up", "at_resume": None}
                 for g, (b, a) in enumerate(zip(before[1], now[1])) if b > 0 and math.isfinite(a) and a >= factor * b]  # fmt: skip
        if not jumps:
            return None
        from spikedoc.analysis.schedule import scheduled_restarts  # pandas: only on a jump

        # The groups' peaks so far stand in for the series before the window (a restart goes back to its peak).
        frame = _lr_frame([(before[0] - 1, peaks), *rows]) if peaks else _lr_frame(rows)
        start = (self.schedule or {}).get("start_step", rows[0][0])
        scheduled = scheduled_restarts(frame, jumps, self.schedule, [int(start)])
        ups = [j for j in jumps if (j["step"], j["group"]) not in scheduled]
        if not ups:
            return None
        return {**max(ups, key=lambda j: j["factor"]), "lrs_before": list(before[1])}

    def _decision(self, reason: str, onset: int, *, evidence: dict[str, Any] | None = None) -> Decision:
        incident = self.incident
        if incident is not None:
            onset = min(onset, incident.onset_step)
            precursor, attributed = incident.precursor_step, list(incident.attributed_steps)
        else:
            precursor, attributed = self._precursor(onset), []
        if reason == "vetoes":
            attributed += list(range(onset, onset + self.vetoes_in_row))
        if incident is not None and incident.lr_jump is not None:  # the jump opened it: its rows may have left `lrs`
            return Decision(reason=reason, onset_step=onset, precursor_step=precursor, cause="lr_schedule",
                            attributed_steps=sorted(set(attributed)), lr_jump=dict(incident.lr_jump),
                            evidence=dict(evidence or {}))  # fmt: skip
        jump = self._lr_jump(precursor)
        if jump is not None:
            # The state before the jump's first step is the last one the jump did not touch.
            precursor = min(precursor, jump["step"])
            jump["lrs_before"] = next((lrs for s, lrs in reversed(self.lrs) if s < jump["step"]), None)
        return Decision(reason=reason, onset_step=onset, precursor_step=precursor,
                        cause="lr_schedule" if jump else "damage", attributed_steps=sorted(set(attributed)),
                        lr_jump=jump, evidence=dict(evidence or {}))  # fmt: skip

    def _lr_jump(self, onset: int) -> dict[str, Any] | None:
        """The last upward LR discontinuity in the lookback before `onset`, by analyze's own rule."""
        from spikedoc.analysis.context import lr_discontinuities
        from spikedoc.analysis.schedule import scheduled_restarts

        rows = [(s, lrs) for s, lrs in self.lrs if onset - self.config.lookback <= s <= onset + 1]
        if len(rows) < 3:
            return None
        frame = _lr_frame(rows)
        jumps = [{**j, "at_resume": None} for j in lr_discontinuities(frame)]
        scheduled = scheduled_restarts(frame, jumps, self.schedule, [int(frame["step"].iloc[0])])
        ups = [j for j in jumps if j["direction"] == "up" and (j["step"], j["group"]) not in scheduled]
        return ups[-1] if ups else None

    # --------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (for a checkpoint loaded with weights_only=True); a judgement not yet
        recorded is not part of it (`record` judges it again)."""
        incident = None
        if self.incident is not None:
            i = self.incident
            incident = {"onset_step": i.onset_step, "precursor_step": i.precursor_step,
                        "attributed_steps": list(i.attributed_steps), "lr_jump": i.lr_jump,
                        "tracker": i.tracker.state_dict() if i.tracker is not None else None}  # fmt: skip
        return {
            "format": _STATE_FORMAT,
            "detector": asdict(self.detector_config),
            "loss_detector": self.loss_detector.state_dict(),
            "grad_detector": self.grad_detector.state_dict(),
            "rank_detectors": self.rank_bands.state_dict(),
            "healthy": [[s, v] for s, v in self.healthy],
            "grad_flags": list(self.grad_flags),
            "lrs": [[s, list(lrs)] for s, lrs in self.lrs],
            "lr_peaks": list(self.lr_peaks),
            "vetoes_in_row": self.vetoes_in_row,
            "recent_vetoes": list(self.recent_vetoes),
            "incident": incident,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; raises ValueError when malformed or saved with other detector settings."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("checkpoint holds no guard judgement state of a known format")
        self.loss_detector.load_state_dict(state["loss_detector"])
        self.grad_detector.load_state_dict(state["grad_detector"])
        self.rank_bands.load_state_dict(state.get("rank_detectors", []))
        try:
            self.healthy = deque(((int(s), float(v)) for s, v in state["healthy"]), maxlen=self.healthy.maxlen)
            self.grad_flags = deque((int(s) for s in state["grad_flags"]), maxlen=self.grad_flags.maxlen)
            self.lrs = deque(((int(s), [float(x) for x in lrs]) for s, lrs in state["lrs"]), maxlen=self.lrs.maxlen)
            self.lr_peaks = [float(x) for x in state.get("lr_peaks", [])]
            self.vetoes_in_row = int(state["vetoes_in_row"])
            self.recent_vetoes = deque((int(s) for s in state.get("recent_vetoes", [])), maxlen=self.recent_vetoes.maxlen)
            self.incident, self._judged = None, None
            if state["incident"] is not None:
                i = state["incident"]
                tracker = None
                if i["tracker"] is not None:
                    tracker = RecoveryTracker(int(i["onset_step"]), [], [], config=self.recovery_config)
                    tracker.load_state_dict(i["tracker"])
                self.incident = _Incident(onset_step=int(i["onset_step"]), precursor_step=int(i["precursor_step"]),
                                          attributed_steps=[int(s) for s in i["attributed_steps"]], tracker=tracker,
                                          lr_jump=i.get("lr_jump"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint holds a malformed guard judgement state ({exc!r})") from exc


def _lr_frame(rows: list[tuple[int, list[float]]]) -> Any:
    """The analysis's step table (`step`, `lr`, `lr_<i>`) of recorded (step, group LRs) rows."""
    import pandas as pd  # the analysis's frame-based rules; only on a jump or a decision

    frame = pd.DataFrame({"step": [s for s, _ in rows]})
    for g in range(max(len(lrs) for _, lrs in rows)):
        frame["lr" if g == 0 else f"lr_{g}"] = [lrs[g] if g < len(lrs) else math.nan for _, lrs in rows]
    return frame


def _beyond(flag: Flag | None, sigma: float) -> bool:
    return flag is not None and flag.warm and math.isfinite(flag.z) and flag.z >= sigma


def _z(flag: Flag | None) -> float:
    return math.nan if flag is None else float(flag.z)
