"""`analyze` shows each guard action's cause as confirmed by a replay (which one) or only inferred."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app
from tests.common.guarded import garbage, nan_grads, run_guarded

runner = CliRunner()


def _corrupt_data(batches):
    corrupt = {i for _, ids in batches for i in ids}

    def fault(step, guard, batch):
        return garbage(batch, guard.model.cfg.vocab_size) if set(batch["idx"].tolist()) <= corrupt else batch

    return fault


def _analyze(run_dir, *options: str):
    return runner.invoke(app, ["analyze", str(run_dir), *options], env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def corrupt_stretch_run(tmp_path_factory):
    """Positions 65-84 of the data order are garbage: one probe, then data skips, no rollback."""
    root = tmp_path_factory.mktemp("stretch")
    _, clean = run_guarded(root / "clean", steps=110, checkpoint_every=20)
    run_guarded(root / "run", steps=110, checkpoint_every=20, fault=_corrupt_data(clean[65:85]))
    return root / "run"


def _actions(run_dir, kind):
    result = _analyze(run_dir, "--json")
    assert "Traceback" not in result.output
    return [a for a in json.loads(result.output)["guard_actions"] if a["kind"] == kind]


def test_a_data_skip_is_confirmed_by_the_state_found_sound_and_the_same_batches_reproducing_on_it(corrupt_stretch_run):
    skips = _actions(corrupt_stretch_run, "data_skip")
    assert sum(len(s["detail"]["positions"]) for s in skips) == 20
    for skip in skips:
        assert skip["cause"]["status"] == "confirmed" and skip["cause"]["found"] == "data"
        assert [(r["replay"], r["found"]) for r in skip["cause"]["replays"]] == [("other_batches", "data"), ("same_batches", "data")]


def test_one_test_serves_a_stretch_while_no_update_is_applied_after_it(corrupt_stretch_run):
    other, same = _actions(corrupt_stretch_run, "replay")
    skips = _actions(corrupt_stretch_run, "data_skip")
    assert (other["detail"]["replay"], same["detail"]["replay"]) == ("other_batches", "same_batches")
    assert same["detail"]["on"] == "vetoed_state" and same["detail"]["of_step"] == skips[0]["detail"]["steps"][0]
    assert len(skips) > 1 and {s["detail"]["cause_test"]["probe_step"] for s in skips} == {other["step"]}
    assert [bool(s["detail"]["cause_test"].get("state_unchanged_since_probe")) for s in skips] == [False] + [True] * (len(skips) - 1)


def test_the_vetoes_of_a_corrupt_stretch_are_inferred_and_nothing_is_rolled_back(corrupt_stretch_run):
    assert _actions(corrupt_stretch_run, "rollback") == []
    vetoes = _actions(corrupt_stretch_run, "veto")
    assert len(vetoes) == 20 and {v["cause"]["status"] for v in vetoes} == {"inferred"}


def test_the_terminal_report_words_the_replay_that_confirmed_a_cause(corrupt_stretch_run):
    result = _analyze(corrupt_stretch_run)
    assert "Traceback" not in result.output
    assert ("cause confirmed by replay (the last healthy batches replayed on the vetoed state: data; the same data "
            "replayed from a good state: data): the data") in result.output
    first = _actions(corrupt_stretch_run, "replay")[0]
    where = ", ".join(str(x) for x in first["detail"]["probe_positions"])
    assert f"replay at step {first['step']} (other batches, positions {where}): found the data at fault" in result.output


def test_the_html_report_has_each_actions_cause(corrupt_stretch_run, tmp_path):
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(corrupt_stretch_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    skips = _actions(corrupt_stretch_run, "data_skip")
    assert "<th>cause</th>" in page and page.count("cause confirmed by replay") == len(skips)


def test_a_fault_that_returns_after_its_rollback_is_confirmed_from_a_good_checkpoint(tmp_path):
    # NaN gradients at every step from 30, whatever the batch: on the good checkpoint the last
    # healthy batches fail too, so the suspect batches' NaN is not theirs (the state or the loop).
    always = nan_grads(set(range(30, 10_000)), first_pass_only=False)
    with pytest.raises(spikedoc.GuardStopped):
        run_guarded(tmp_path, steps=200, checkpoint_every=20, max_rollbacks=2, after_backward=always)
    rollbacks = _actions(tmp_path, "rollback")
    assert [(r["replay"], r["found"]) for r in rollbacks[0]["cause"]["replays"]] == [
        ("other_batches", "state"), ("same_batches", "not_data")]  # fmt: skip
    assert rollbacks[0]["cause"]["found"] == "state" and rollbacks[0]["detail"]["skipped_positions"] == []
    assert [r["cause"]["status"] for r in rollbacks] == ["confirmed", "confirmed"]
    assert rollbacks[1]["cause"]["replays"] == [{"replay": "from_good_checkpoint", "found": "state"}]
    [stop] = _actions(tmp_path, "guard_stop")
    assert stop["detail"]["reason"] == "recurring" and stop["cause"]["found"] == "state"


def test_a_rollback_whose_suspect_batches_are_ordinary_on_the_good_checkpoint_skips_no_data(tmp_path):
    # NaN gradients at steps 60-64 (first pass only: the loop, not the data) with ordinary losses:
    # the step 60 batches replayed on the checkpoint are in band, so the rollback cuts the LR and
    # skips nothing, and the cause stays inferred with the data ruled out.
    guard, _ = run_guarded(tmp_path, steps=90, checkpoint_every=20, after_backward=nan_grads(set(range(60, 65))))
    [rollback] = _actions(tmp_path, "rollback")
    assert rollback["detail"]["skipped_positions"] == [] and rollback["detail"]["lr_scale"] == pytest.approx(0.7)
    other, same = rollback["detail"]["evidence"]["cause_test"]["replays"]
    assert (other["replay"], other["on"], other["found"]) == ("other_batches", "checkpoint", "data")  # in band
    assert (same["replay"], same["on"], same["found"], same["of_step"]) == ("same_batches", "checkpoint", "not_data", 60)
    assert rollback["cause"]["status"] == "inferred" and rollback["cause"]["ruled_out"] == ["data"]
    assert guard.skipped_positions == []


def test_a_veto_and_rollback_on_collapsed_second_moments_are_measured_not_inferred():
    from spikedoc.analysis.guard_actions import cause_status

    veto = cause_status("veto", {"reasons": ["optimizer_state_collapsed"]})
    rollback = cause_status("rollback", {"cause": "optimizer_state", "reason": "optimizer_state"})
    assert veto == rollback == {"status": "measured", "replays": [], "found": "state"}
    assert cause_status("veto", {"reasons": ["loss_out_of_band"]})["status"] == "inferred"


@pytest.mark.parametrize(("at", "value"), [(70, float("nan")), (45, float("inf")), (88, float("nan"))])
def test_a_vetoed_non_finite_loss_is_numerics_not_a_batch_the_loss_scaler_skipped(tmp_path, at, value):
    # The guard's veto records the step as skipped (no update), as a loss scaler's skip would be; a
    # NaN or inf loss on one step of a run without a scaler is numerics, and the veto is not a scaler's.
    planted = set()

    def non_finite_loss_once(step, guard, batch):
        if step == at and step not in planted:
            planted.add(step)
            return {**batch, "loss_weight": value}
        return batch

    run_guarded(tmp_path, steps=100, checkpoint_every=20, fault=non_finite_loss_once)
    [incident] = spikedoc.analyze(tmp_path).incidents
    assert (incident.onset_step, incident.kind, incident.cause) == (at, "nonfinite", "numerics_rank")
    assert incident.handled_by_guard and not any("scaler" in line for line in incident.evidence)

def test_a_vetoed_non_finite_gradient_on_one_step_is_numerics_not_a_loss_scaler_skip(tmp_path):
    run_guarded(tmp_path, steps=100, checkpoint_every=20, after_backward=nan_grads({57}))
    [incident] = spikedoc.analyze(tmp_path).incidents
    assert (incident.onset_step, incident.kind, incident.cause) == (57, "nonfinite", "numerics_rank")
    assert incident.handled_by_guard and not any("scaler" in line for line in incident.evidence)


def _policy_after(rollback: dict):
    from spikedoc.guard.policy import Policy

    policy = Policy(clip=None)
    policy.actions.append({"kind": "rollback", "reason": "vetoes", "lr_scale_before": 1.0, "clip_before": 2.0, **rollback})
    return policy


@pytest.mark.parametrize(("rollback", "continues", "reverted"), [
    ({}, True, True),
    ({}, False, False),  # a stretch that does not continue the batches it skipped
    ({"lr_held": True}, True, False),  # an LR hold is the schedule's remedy, not a hypothesis about the state
    ({"reverted": True}, True, False),  # undone already
    ({"reason": "damage"}, True, False),  # not made on vetoes
])  # fmt: skip
def test_a_data_skip_undoes_only_the_remedy_of_a_vetoes_rollback_whose_skipped_batches_it_continues(rollback, continues, reverted):
    from spikedoc.guard.cause import rollback_to_revert

    assert (rollback_to_revert(_policy_after(rollback), continues=continues) is not None) is reverted


def test_undoing_a_rollback_that_tightened_the_loops_own_clip_gives_clipping_back_to_the_loop():
    from spikedoc.guard.cause import remedy_undone

    assert remedy_undone({"lr_scale_before": 1.0, "clip_before": 2.0, "clip_of_loop": True}) == (1.0, None)
    assert remedy_undone({"lr_scale_before": 0.7, "clip_before": 1.0}) == (0.7, 1.0)


def test_a_corrupt_stretch_vetoed_except_for_the_guards_probe_steps_is_handled_by_the_guard(corrupt_stretch_run):
    # The probe steps between the vetoes (the last healthy batches, then the suspect ones, replayed on
    # the vetoed state) are judged and never applied: with the vetoes they cover every flagged step.
    result = _analyze(corrupt_stretch_run, "--json")
    assert result.exit_code == 0, result.output
    [incident] = json.loads(result.output)["incidents"]
    probes = [a["step"] for a in _actions(corrupt_stretch_run, "replay")]
    assert probes and all(incident["onset_step"] < s < incident["end_step"] for s in probes)
    assert incident["handled_by_guard"]
    [action] = incident["recommendation"]["actions"]
    assert action["action"] == "guard_handled" and "replayed step" in action["because"]
