"""The guard replays a suspect step before it acts: the data is skipped only when its batches reproduce the fault."""

from __future__ import annotations

import pytest

from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Decision, Verdict
from spikedoc.guard.remedy import plan_remedy
from spikedoc.guard.replay import reproduces
from tests.common.guarded import garbage, run_guarded


def _verdict(loss: float, loss_z: float, reasons: tuple[str, ...] = ()) -> Verdict:
    return Verdict(step=70, loss=loss, grad_norm=1.0, veto=bool(reasons), reasons=reasons, loss_z=loss_z, grad_z=0.0,
                   loss_flagged=loss_z >= 7, grad_flagged=False)  # fmt: skip


def test_a_replay_reproduces_when_its_loss_stands_the_threshold_above_an_ordinary_batch_on_the_same_state():
    assert reproduces(_verdict(9.0, 30.0), reference_z=2.0, threshold=7.0)
    assert not reproduces(_verdict(9.0, 30.0), reference_z=25.0, threshold=7.0)  # the state, not the batch
    assert not reproduces(_verdict(3.0, 6.0), reference_z=None, threshold=7.0)


def test_a_non_finite_replay_reproduces_whatever_its_reference():
    assert reproduces(_verdict(float("nan"), float("inf"), ("nonfinite",)), reference_z=50.0, threshold=7.0)
    assert reproduces(_verdict(3.0, 0.5, ("nonfinite",)), reference_z=0.0, threshold=7.0)  # a NaN gradient again


def test_batches_shown_at_fault_are_skipped_with_nothing_else_changed_and_ordinary_ones_are_not_skipped():
    d = Decision(reason="vetoes", onset_step=5, precursor_step=4, cause="damage", attributed_steps=[5, 6])
    batches = {5: ([7], ["a"]), 6: ([8], ["b"])}
    data = plan_remedy(d, config=GuardConfig(), clip=1.0, lr_scale=1.0, hold=None, batches=batches, data=True)
    assert (data.skip_positions, data.lr_scale, data.clip) == ([7, 8], 1.0, 1.0)
    ordinary = plan_remedy(d, config=GuardConfig(), clip=1.0, lr_scale=1.0, hold=None, batches=batches, data=False)
    assert ordinary.skip_positions == [] and ordinary.lr_scale == pytest.approx(0.7)
    untested = plan_remedy(d, config=GuardConfig(), clip=1.0, lr_scale=1.0, hold=None, batches=batches)
    assert untested.skip_positions == [7, 8] and untested.lr_scale == pytest.approx(0.7)


def _flaky_loss(first: int, last: int):
    """A fault of the loop, not of the data: garbage in place of the batch at steps `first`-`last` only
    (by the step index), so the same batches handed out again at a later step are clean."""

    def fault(step, guard, batch):
        return garbage(batch, guard.model.cfg.vocab_size) if first <= step <= last else batch

    return fault


def test_a_fault_that_does_not_reproduce_on_the_same_state_skips_no_data_and_does_not_roll_back(tmp_path):
    guard, seen = run_guarded(tmp_path, steps=100, checkpoint_every=20, fault=_flaky_loss(60, 64))
    replays = [a for a in guard.actions if a["kind"] == "replay"]
    assert [(r["replay"], r["on"], r["found"]) for r in replays] == [
        ("other_batches", "vetoed_state", "data"), ("same_batches", "vetoed_state", "transient")]  # fmt: skip
    assert replays[1]["of_step"] == 60
    assert [a["kind"] for a in guard.actions if a["kind"] in ("rollback", "data_skip")] == []
    assert guard.skipped_positions == [] and guard.lr_scale == 1.0
    assert [step for step, _ in seen][-1] == 99  # the run went on to the end


def test_a_same_batch_replay_that_reproduces_names_the_data_and_skips_it(tmp_path):
    _, clean = run_guarded(tmp_path / "clean", steps=80, checkpoint_every=20)
    corrupt = {i for _, ids in clean[60:65] for i in ids}  # data positions 60-64: garbage wherever they are met

    def fault(step, guard, batch):
        return garbage(batch, guard.model.cfg.vocab_size) if set(batch["idx"].tolist()) <= corrupt else batch

    guard, _ = run_guarded(tmp_path / "run", steps=80, checkpoint_every=20, fault=fault)
    same = next(a for a in guard.actions if a["kind"] == "replay" and a["replay"] == "same_batches")
    assert (same["on"], same["found"], same["of_step"]) == ("vetoed_state", "data", 60)
    [skip] = [a for a in guard.actions if a["kind"] == "data_skip"]
    assert skip["positions"] == list(range(60, 65)) and skip["cause_test"]["found"] == "data"
    assert guard.rollbacks == 0 and guard.lr_scale == 1.0
