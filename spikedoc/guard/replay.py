"""The guard's replays: a suspect step tried again, judged and never applied, before acting on a cause.

Megatron-LM's rerun machinery and PaLM's post-mortems settled a spike's cause by running its step
again. The guard holds what that needs: the last healthy step's batches, the batches of the steps
it vetoed or flagged (`SUSPECTS`), and the newest good checkpoint in host memory. Before it acts on
vetoes that pile up, or rolls back, it hands the loop replay steps, each judged by the same band:

- `other_batches`: the last healthy step's batches on the state the vetoes came from (vetoes for
  their loss, no update applied since that step). In band: the state is sound (`found: data`, the
  state is cleared); out of band or non-finite: the state is broken (`found: state`).
- `same_batches`: the suspect step's batches (the incident's first held step) on a good state: the
  state the vetoes came from once `other_batches` found it sound (`on: vetoed_state`), else the
  rollback's good checkpoint, put back from memory before the rollback proper (`on: checkpoint`,
  after `other_batches` on it too). It reproduces when a value is non-finite again, or its loss
  stands the detector's `threshold` (7) band sigmas above what the same state gives an ordinary
  batch: the last healthy batches' replay on it (without one, on a checkpoint, the loss the
  checkpoint's own step had on it, recorded as it trained). It then finds `data`; else `transient`
  (on the sound state: the fault did not reproduce, neither the data nor the state) or `not_data`
  (on the checkpoint: the batches are ordinary on a good state, the trajectory since is at fault,
  the state or the schedule). When the last healthy batches fail on the good checkpoint too, the
  fault is not the batches' whatever they do (`not_data`), and that replay finds `state` (the
  state or the loop: it fails from a good state).
- `lr_before_jump`: a rollback for an LR jump holds the LR before the jump and skips no batch, so
  its replay is the same state and data with only the LR changed; passing the step it rolled back
  from with no new decision confirms the schedule (`schedule_confirmed`). Unlike the others it is
  the rollback's own replay: an applied test of the jumped update from the checkpoint would cost
  the steps from the checkpoint to the jump twice.

The conclusion (`cause_test` in the action's evidence) picks the remedy: data on a sound state is
skipped without a rollback; data found from the checkpoint is skipped on rollback with nothing else
changed; `not_data` and `state` roll back with the LR cut and clipping tightened (or the LR held
before a jump) and no batch skipped; a `transient` fault changes nothing (its steps were vetoed),
and a second one on the same state rolls back.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from spikedoc.detector.streaming import StreamingDetector
from spikedoc.guard.cause import corrupt_stretch
from spikedoc.guard.judge import Decision, Verdict
from spikedoc.guard.policy import Policy
from spikedoc.guard.steps import PendingStep, Replay, SeenStep

__all__ = ["CauseTests", "reproduces", "schedule_confirmed", "SUSPECTS"]

#: Steps vetoed or flagged whose batches are kept for a same-batch replay (the newest).
SUSPECTS = 16
#: Checkpoint steps whose own loss is kept as the reference of their state.
_REFERENCES = 8


def reproduces(replay: Verdict, reference_z: float | None, threshold: float) -> bool:
    """A replay of a suspect step reproduces its fault: a non-finite value again (the loss, or the
    gradient norm on some rank), or a loss `threshold` band sigmas above `reference_z`, the band z of
    an ordinary batch on the same state (None: the band's median, z 0).

    Example:
        >>> v = Verdict(step=9, loss=9.0, grad_norm=1.0, veto=True, reasons=("loss_out_of_band",), loss_z=40.0,
        ...             grad_z=1.0, loss_flagged=True, grad_flagged=False)
        >>> reproduces(v, 35.0, 7.0), reproduces(v, 1.0, 7.0)
        (False, True)
    """
    if not math.isfinite(replay.loss) or "nonfinite" in replay.reasons:
        return True
    base = reference_z if reference_z is not None and math.isfinite(reference_z) else 0.0
    return math.isfinite(replay.loss_z) and replay.loss_z - max(base, 0.0) >= threshold


def schedule_confirmed(policy: Policy, step: int) -> dict[str, Any] | None:
    """The `lr_before_jump` finding once the replay of the last rollback, made for an LR jump with the
    LR held and no batch skipped, has passed the step it rolled back from with no new action; None
    before (or for any other rollback, or once confirmed)."""
    rollback = policy.last_rollback()
    if (rollback is None or not rollback.get("lr_held") or rollback.get("skipped_positions") or "lr_confirmed" in rollback
            or step <= rollback["from_step"]):  # fmt: skip
        return None  # the usual case, decided without reading the actions since
    at = next((i for i, a in enumerate(policy.actions) if a is rollback), len(policy.actions))
    if any(a["kind"] in ("rollback", "data_skip", "guard_stop") for a in policy.actions[at + 1 :]):
        return None
    return {"replay": "lr_before_jump", "found": "schedule", "from_step": rollback["from_step"],
            "to_step": rollback["to_step"], "jump_step": rollback["lr_held"]["from_step"], "passed_step": step - 1}  # fmt: skip


class CauseTests:
    """The batches a replay needs, the replays waiting for a decision, and their findings.

    The guard asks `plan` what a decision calls for, hands out `next_step` while replays wait,
    gives each judged one to `judge`, and acts on `after`'s answer with `conclusion` as evidence.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        """Band sigmas over an ordinary batch on the same state at which a replay reproduces."""
        self.last_good: PendingStep | None = None
        """The last step applied with its loss in band, with its batches (those the guard handed out)."""
        self.sound: dict[str, Any] | None = None
        """The conclusion of the last test that found the data at fault on a sound state; None once an
        update is applied or a state put back after it (the same state would give the same losses)."""
        self.transient: dict[str, Any] | None = None
        """The conclusion of the last test that found a fault that did not reproduce (same lifetime)."""
        self.decision: Decision | None = None
        """The decision the waiting or running replays test."""
        self.target: tuple[Any, dict[str, Any]] | None = None
        """The rollback's good checkpoint and its state, for a replay on it."""
        self.findings: list[dict[str, Any]] = []
        self.target_loaded = False
        """The target's state is the live one (put back for a replay on it)."""
        self.began_at: int | None = None
        """Step index of the first replay of the test under way."""
        self._queue: list[Replay] = []
        self._suspects: deque[PendingStep] = deque(maxlen=SUSPECTS)
        self._references: dict[int, float] = {}
        self._checkpointed: int | None = None

    # ------------------------------------------------------------------ what the guard has seen

    def remember(self, p: PendingStep) -> None:
        """A finished step: kept as the last healthy one, as a suspect, or as its checkpoint's reference."""
        v = p.verdict
        if v is None:
            return
        if not v.veto:
            self.sound = self.transient = None  # an update: the state is no longer the one tested
            if not v.loss_flagged and p.batches:
                self.last_good = p
            if p.step == self._checkpointed and math.isfinite(v.loss) and not v.loss_flagged:
                self._references[p.step] = v.loss
                for old in sorted(self._references)[:-_REFERENCES]:
                    del self._references[old]
        if (v.veto or v.loss_flagged) and p.batches:
            self._suspects.append(p)
        self._checkpointed = None

    def checkpointed(self, step: int) -> None:
        """A checkpoint holds the state before step `step`: that step's loss is its reference."""
        self._checkpointed = step

    # ------------------------------------------------------------------------- deciding to test

    def plan(self, decision: Decision, vetoed: list[SeenStep]) -> str:
        """What `decision` calls for: `test` (replays first: `next_step`), `skip` (a corrupt stretch on a
        state a test found sound, unchanged since), or `rollback` (the guard may still test it on the
        checkpoint: `from_checkpoint`)."""
        if not corrupt_stretch(decision, vetoed):
            return "rollback"
        if self.sound is not None:
            return "skip"
        if self.transient is not None or self.last_good is None:
            return "rollback"  # a fault that did not reproduce came back on the same state: the trajectory's
        self._start(decision)
        good = self.last_good
        self._queue = [Replay(kind="other_batches", on="vetoed_state", of_step=good.step, positions=list(good.positions),
                              batches=good.batches, sample_offset=good.sample_offset)]  # fmt: skip
        return "test"

    def from_checkpoint(self, decision: Decision, target: tuple[Any, dict[str, Any]]) -> bool:
        """Queue the last healthy step's batches, then the suspect step's, on the rollback's good
        checkpoint `target`; False (nothing queued) when no suspect's batches are held or the
        checkpoint is not before the suspect."""
        suspect = self._suspect(decision)
        if suspect is None or target[0].step > suspect.step:
            return False
        if self.decision is not decision:
            self._start(decision)
        self.target = target
        good = self.last_good
        self._queue = [] if good is None else [
            Replay(kind="other_batches", on="checkpoint", of_step=good.step, positions=list(good.positions),
                   batches=good.batches, sample_offset=good.sample_offset)]  # fmt: skip
        self._queue.append(Replay(kind="same_batches", on="checkpoint", of_step=suspect.step, positions=list(suspect.positions),
                                  batches=suspect.batches, sample_offset=suspect.sample_offset,
                                  reference=self._references.get(target[0].step)))  # fmt: skip
        return True

    def next_step(self, step: int, sample_offset: int) -> PendingStep | None:
        """The replay step to hand out now, if one waits (judged, never applied)."""
        if not self._queue or self.decision is None:
            return None
        r = self._queue.pop(0)
        self.began_at = step if self.began_at is None else self.began_at
        return PendingStep(step=step, positions=list(r.positions), batches=r.batches, sample_offset=sample_offset,
                           probe=self.decision, replay=r)  # fmt: skip

    def abandon(self) -> tuple[Decision, tuple[Any, dict[str, Any]] | None]:
        """Drop the test under way (the loop cannot be handed its batches): its decision and target."""
        decision, target = self.decision, self.target
        assert decision is not None
        self.clear()
        return decision, target

    def clear(self) -> None:
        """No test under way (a state was put back, or the test ended)."""
        self._queue, self.decision, self.target, self.findings, self.began_at = [], None, None, [], None
        self.target_loaded = False

    # ---------------------------------------------------------------------------- judging replays

    def judge(self, p: PendingStep, band: StreamingDetector) -> dict[str, Any]:
        """The finding of replay step `p` (its verdict judged), kept for the conclusion."""
        r, v = p.replay, p.verdict
        assert r is not None and v is not None
        out: dict[str, Any] = {"replay": r.kind, "on": r.on, "probe_step": p.step, "probe_positions": p.positions,
                               "of_step": r.of_step, "loss": v.loss, "loss_z": v.loss_z,
                               "nonfinite": not math.isfinite(v.loss) or "nonfinite" in v.reasons}  # fmt: skip
        if r.kind == "other_batches":
            broken = out["nonfinite"] or v.loss_flagged or "loss_out_of_band" in v.reasons
            out["found"] = "state" if broken else "data"
        else:
            other = next((f for f in reversed(self.findings) if f["replay"] == "other_batches" and f["on"] == r.on), None)
            reference_z = other["loss_z"] if other is not None else self._reference_z(r, p.step, band)
            out["reference_z"] = reference_z
            # Ordinary batches failing on the same state say nothing about these: not the data.
            at_fault = (other is None or other["found"] != "state") and reproduces(v, reference_z, self.threshold)
            out["found"] = "data" if at_fault else ("transient" if r.on == "vetoed_state" else "not_data")
        self.findings.append(out)
        return out

    def after(self, finding: dict[str, Any]) -> str:
        """What the guard does after a finding: `wait` (another replay queued), `skip` (the data, on a
        sound state), `go_on` (a transient fault), `rollback` (the state: the guard may test it on
        the checkpoint), or `roll_back_tested` (the replays on the checkpoint ended: roll back with their finding)."""
        if finding["on"] == "checkpoint":
            return "wait" if self._queue else "roll_back_tested"
        if finding["replay"] == "other_batches":
            if finding["found"] == "state":
                return "rollback"
            suspect = self._suspect(self.decision) if self.decision is not None else None
            if suspect is None:  # nothing to replay: the probe alone (the state is sound) names the data
                return "skip"
            self._queue.append(Replay(kind="same_batches", on="vetoed_state", of_step=suspect.step,
                                      positions=list(suspect.positions), batches=suspect.batches,
                                      sample_offset=suspect.sample_offset))  # fmt: skip
            return "wait"
        return "skip" if finding["found"] == "data" else "go_on"

    def conclusion(self) -> dict[str, Any]:
        """The `cause_test` of the test so far: the last finding's fields, `found` (the state, once a
        replay found it broken), `probe_step` (the first replay's) and every replay (`replays`)."""
        last, first = self.findings[-1], self.findings[0]
        found = "state" if any(f["found"] == "state" for f in self.findings) else last["found"]
        out = {**last, "found": found, "probe_step": first["probe_step"], "probe_positions": first["probe_positions"],
               "replays": [{k: f[k] for k in ("replay", "on", "found", "probe_step", "of_step", "loss", "loss_z")}
                           for f in self.findings]}  # fmt: skip
        if found == "state":
            out["nonfinite"] = any(f["nonfinite"] for f in self.findings if f["found"] == "state")
        return out

    def data_at_fault(self) -> bool | None:
        """Whether the test showed the suspect batches at fault (None: no same-batch replay ran)."""
        same = [f for f in self.findings if f["replay"] == "same_batches"]
        return same[-1]["found"] == "data" if same else None

    # --------------------------------------------------------------------------------- internals

    def _start(self, decision: Decision) -> None:
        self.clear()
        self.decision = decision

    def _suspect(self, decision: Decision) -> PendingStep | None:
        """The held step the decision blames first: its first attributed (or onset) step kept, else
        the first kept since its onset."""
        held = {p.step: p for p in self._suspects}  # a replayed step: its latest pass
        for step in sorted({decision.onset_step, *decision.attributed_steps}):
            if step in held:
                return held[step]
        return next((held[s] for s in sorted(held) if s >= decision.onset_step), None)

    def _reference_z(self, r: Replay, step: int, band: StreamingDetector) -> float | None:
        """Band z of the checkpoint step's own recorded loss on its state, where no ordinary batch
        was replayed on it; None when not recorded either."""
        if r.reference is None:
            return None
        return float(band.assess(step, r.reference).z)
