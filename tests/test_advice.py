"""Advice follows the evidence: verdicts, severities and recommendations on real recorded runs."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import spikedoc
from spikedoc.analysis._robust import fmt
from spikedoc.analysis.advice import _recovered_because
from spikedoc.analysis.incident import Incident
from spikedoc.cli import app
from spikedoc.report.terminal import action_text
from tests.common.resumes import resume_with_second_moments_scaled

RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
REAL = RUNS / "real"


@functools.cache
def _diagnosis(name: str) -> spikedoc.Diagnosis:
    return spikedoc.analyze(RUNS / name)


def _first(name: str) -> spikedoc.Incident:
    return _diagnosis(name).incidents[0]


def _actions(incident) -> list[str]:
    return [a["action"] for a in incident.recommendation["actions"]]


def test_a_fault_that_leaves_lasting_damage_is_rolled_back():
    inc = _first("lr_surge")
    assert inc.verdict in ("recovered_with_damage", "persistent") and not inc.recovered
    assert inc.recommendation["rollback"] and inc.severity == "severe"
    assert inc.damage["excess_ratio"] > 0.1


def test_after_an_lr_jump_the_peak_lr_is_the_schedules_not_the_jumped_one():
    inc, ctx = _first("lr_surge"), _diagnosis("lr_surge").context[0]
    rec = inc.recommendation
    assert rec["new_peak_lr"] == pytest.approx(3e-3, rel=1e-3)  # the recipe's peak; the surge reached 20x that
    assert ctx["warmup"]["peak_lr"] == pytest.approx(3e-3, rel=1e-3) and ctx["warmup"]["end_step"] < 150
    assert rec["hold_lr"] == pytest.approx(ctx["lr_jump"]["before"])


def test_a_schedule_jump_without_a_resume_is_not_blamed_on_scheduler_state():
    actions = _actions(_first("lr_surge"))
    assert "fix_schedule" in actions and "restore_scheduler" not in actions


def test_a_transient_bad_batch_is_not_rolled_back_and_gets_no_lr_or_clip_advice():
    inc = _first("bad_batch_constant")
    assert (inc.verdict, inc.recommendation["rollback"]) == ("recovered", False)
    assert "lower_lr" not in _actions(inc) and "tighten_clip" not in _actions(inc)
    assert inc.recommendation["lr_factor"] is None and inc.recommendation["clip_max_norm"] is None


@pytest.mark.parametrize("name", ["bad_batch_constant", "bad_batch_long", "bad_batch_random"])
def test_a_bad_batch_recommendation_always_names_what_to_skip(name):
    inc = _first(name)
    skip = next(a for a in inc.recommendation["actions"] if a["action"] == "skip_data")
    labels = spikedoc.load(RUNS / name).steps  # the planted ids are the batch's
    assert skip["steps"] and set(skip["sample_ids"]) <= set(labels.loc[labels["step"].isin(skip["steps"]), "sample_ids"].explode())
    assert skip["sample_ids"]


def test_every_action_names_its_evidence():
    for name in ("lr_surge", "bad_batch_long", "optimizer_state", "state_reset", "nan"):
        for action in _first(name).recommendation["actions"]:
            assert isinstance(action["because"], str) and len(action["because"]) > 20, (name, action)


def test_a_small_blip_is_minor_and_exits_0():
    inc = _first("minor_blip")
    assert inc.severity == "minor" and _actions(inc) == ["none"]
    result = CliRunner().invoke(app, ["analyze", str(RUNS / "minor_blip")])
    assert result.exit_code == 0 and "minor" in result.output


def test_a_severe_incident_exits_1():
    assert CliRunner().invoke(app, ["analyze", str(RUNS / "lr_surge")]).exit_code == 1


def test_a_bad_batch_in_a_run_whose_optimizer_state_drifts_slowly_is_the_batchs(tmp_path):
    # The recorded run with biases, its bias tensors' second moments made to drift down 30x over the
    # run (smoothly, as a shrinking gradient does): a level far from history, but no sudden change.
    run = tmp_path / "run"
    shutil.copytree(RUNS / "bad_batch_random", run)
    for part in sorted((run / "layers").rglob("*.parquet")):
        table = pq.read_table(part).to_pandas()
        bias = table["name"].astype(str).str.endswith(".bias")
        drift = 30.0 ** (-table.loc[bias, "step"].to_numpy(dtype=float) / 300.0)
        table.loc[bias, "exp_avg_sq_mean"] = (table.loc[bias, "exp_avg_sq_mean"].to_numpy(dtype=float) * drift).astype("float32")
        table.to_parquet(part, index=False)
    inc = spikedoc.analyze(run).incidents[0]
    assert (inc.onset_step, inc.cause) == (220, "bad_batch")
    assert not any("exp_avg_sq" in e for e in inc.evidence)
    assert "reset_moments" not in _actions(inc)


def _restarted_curve(param_norm_back: bool | None) -> pd.DataFrame:
    """A real loss curve that starts over at step 2500, with a parameter norm that goes back there or not (None: none logged)."""
    steps = pd.read_csv(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")
    steps = steps.loc[steps["step"] <= 3000].copy()
    at = steps["step"] >= 2500  # from here the loss is as if untrained: the curve starts over
    steps.loc[at, "loss"] = steps["loss"].to_numpy()[: int(at.sum())]
    if param_norm_back is not None:
        grown = 40.0 + 0.01 * steps["step"].to_numpy(dtype=float)  # the weights' norm grows as they train
        steps["param_norm"] = np.where(at & param_norm_back, 40.0, grown)
    return steps


def test_a_loss_back_at_its_untrained_level_with_the_weights_back_at_their_start_is_a_state_reset(tmp_path):
    csv = tmp_path / "reset.csv"
    _restarted_curve(param_norm_back=True).to_csv(csv, index=False)
    inc = next(i for i in spikedoc.analyze(csv).incidents if i.onset_step >= 2500)
    assert (inc.onset_step, inc.cause, inc.severity) == (2500, "state_reset", "severe")
    assert "the weights were reset" in inc.evidence[0] and any("untrained level" in e for e in inc.evidence)


def test_a_loss_back_at_its_untrained_level_while_the_weights_moved_on_is_no_state_reset(tmp_path):
    csv = tmp_path / "thrown.csv"
    _restarted_curve(param_norm_back=False).to_csv(csv, index=False)
    inc = next(i for i in spikedoc.analyze(csv).incidents if i.onset_step >= 2500)
    assert inc.cause != "state_reset" and "load_state" not in _actions(inc)


def test_a_loss_back_at_its_untrained_level_without_a_parameter_norm_is_unknown_and_says_what_would_tell(tmp_path):
    csv = tmp_path / "loss_only.csv"
    _restarted_curve(param_norm_back=None).to_csv(csv, index=False)
    inc = next(i for i in spikedoc.analyze(csv).incidents if i.onset_step >= 2500)
    assert (inc.onset_step, inc.cause, inc.severity) == (2500, "unknown", "severe")
    assert any("without the parameter norm (not logged)" in e for e in inc.evidence)


def test_a_loss_thrown_back_to_its_untrained_level_right_after_an_lr_jump_is_the_jump_not_a_state_reset(tmp_path):
    steps = pd.read_csv(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")
    steps = steps.loc[steps["step"] <= 3000].copy()
    at = steps["step"] >= 2500
    steps.loc[at, "loss"] = steps["loss"].to_numpy()[: int(at.sum())]
    steps["lr"] = np.where(steps["step"] >= 2499, 4e-2, 1e-3)  # the schedule jumped 40x one step before
    csv = tmp_path / "surge.csv"
    steps.to_csv(csv, index=False)
    inc = next(i for i in spikedoc.analyze(csv).incidents if i.onset_step >= 2500)
    assert (inc.onset_step, inc.cause) == (2500, "lr_schedule")
    assert any("the jump undid much of the training" in e for e in inc.evidence)
    assert "load_state" not in _actions(inc) and "fix_schedule" in _actions(inc)


def test_a_csv_without_lr_or_grad_norm_gets_no_lr_or_clip_advice(tmp_path):
    steps = pd.read_csv(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")
    steps.loc[steps["step"] >= 3000, "loss"] *= 1.25  # lasting damage
    csv = tmp_path / "damaged.csv"
    steps.to_csv(csv, index=False)
    inc = next(i for i in spikedoc.analyze(csv).incidents if i.onset_step >= 3000)
    assert inc.recommendation["rollback"]
    assert inc.recommendation["lr_factor"] is None and inc.recommendation["clip_max_norm"] is None
    assert {"lower_lr", "tighten_clip"}.isdisjoint(_actions(inc))


def test_healthy_public_run_has_no_severe_incident_and_its_data_spikes_recover():
    incidents = spikedoc.analyze(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv").incidents
    assert incidents and all(i.verdict == "recovered" and i.severity != "severe" for i in incidents)
    assert all(not i.recommendation["rollback"] for i in incidents)


def test_a_layer_part_damaged_inside_reaches_the_diagnosis_warnings(tmp_path):
    # The footer is intact (the part passes the check at load) but the data pages are not: the
    # failure shows only when analyze reads the incident's layer window, and must still be reported.
    run = tmp_path / "run"
    shutil.copytree(RUNS / "bad_batch_long", run)
    parts = sorted((run / "layers").rglob("*.parquet"))
    part = next(p for p in parts if 170 in set(pq.read_table(p, columns=["step"]).column("step").to_pylist()))
    data = bytearray(part.read_bytes())
    data[4:len(data) // 2] = bytes(len(data) // 2 - 4)  # zero the first half: pages unreadable, footer kept
    part.write_bytes(bytes(data))
    diagnosis = spikedoc.analyze(run)
    assert any(str(part.name) in w for w in diagnosis.warnings), diagnosis.warnings


def _minor_lr_surge(tmp_path: Path) -> Path:
    """The clean run's log with a 5-step LR surge that only nudged the loss (as clipping can make it)."""
    steps = spikedoc.load(RUNS / "clean").steps.sort_values("step")[["step", "loss", "lr"]].copy()
    steps.loc[steps["step"].between(250, 254), "lr"] *= 20
    steps.loc[steps["step"] == 251, "loss"] *= 1.3
    run = tmp_path / "run.csv"
    steps.to_csv(run, index=False)
    return run


def test_a_minor_incident_caused_by_the_schedule_still_names_the_schedule_fix(tmp_path):
    # Nothing to undo, but the schedule that jumped must still be fixed.
    inc = next(i for i in spikedoc.analyze(_minor_lr_surge(tmp_path)).incidents if i.onset_step == 251)
    assert (inc.cause, inc.severity) == ("lr_schedule", "minor")
    assert _actions(inc) == ["none", "fix_schedule"]
    assert action_text(inc.recommendation["actions"][0]) == "no rollback needed: the run recovered by itself"


def test_a_minor_incident_with_a_schedule_to_fix_needs_attention_and_exits_1(tmp_path):
    result = CliRunner().invoke(app, ["analyze", str(_minor_lr_surge(tmp_path))])
    assert result.exit_code == 1 and "minor" in result.output


@pytest.mark.parametrize(("run", "replay"), [("lr_jump", False), ("lr_surge", True)])
def test_the_schedule_fix_speaks_of_a_replay_only_when_a_rollback_is_advised(run, replay):
    # A run that recovered from the jump has nothing to replay: the fix is to its schedule's code.
    inc = _first(run)
    fix = next(a for a in inc.recommendation["actions"] if a["action"] == "fix_schedule")
    assert inc.recommendation["rollback"] is replay
    text = action_text(fix)
    assert ("replay" in text) is replay, text
    assert f"step {fix['step']}" in text and fmt(fix["hold_lr"]) in text, text


def test_a_recovered_incident_with_nothing_else_to_do_says_no_action_is_needed():
    [action] = _first("minor_blip").recommendation["actions"]
    assert action_text(action) == "no action needed: the run recovered by itself"


def test_a_recovered_bad_batch_says_no_rollback_is_needed_before_naming_what_to_skip():
    first, *rest = _first("bad_batch_constant").recommendation["actions"]
    assert action_text(first) == "no rollback needed: the run recovered by itself"
    assert [a["action"] for a in rest] == ["skip_data"]


def test_no_incident_of_a_run_whose_second_moments_were_written_from_outside_advises_resetting_them(tmp_path):
    # The demo's zeroed exp_avg_sq, recorded at watch()'s defaults: the first incident finds the writer
    # and rolls back before it; the one after it, led by the same write, does not ask for the moments
    # to be reset by hand.
    from spikedoc.demo import record_demo_run

    incidents = spikedoc.analyze(record_demo_run(tmp_path / "run", "optimizer_state")).incidents
    actions = [a["action"] for i in incidents for a in i.recommendation["actions"]]
    assert "find_state_writer" in actions and "reset_moments" not in actions


def test_a_recovery_up_to_the_runs_last_step_does_not_claim_steps_after_the_incident():
    inc = Incident(kind="grad_spike", metric="grad_norm", onset_step=151, peak_step=240, end_step=299, magnitude_sigma=2.9,
                   peak_ratio=4.2, baseline=0.73, peak_value=3.1, recovered=True, recovery_step=151)
    inc.damage = {"back_step": 151, "damage_step": 299, "observed_steps": 0, "excess_ratio": -0.089, "excess_sigma": -2.8}
    said = _recovered_because(inc)
    assert "0 steps after" not in said and "up to step 299, the last step" in said


@pytest.mark.parametrize(("seed", "resume_at", "betas"), [(4, 100, (0.9, 0.95)), (6, 130, (0.9, 0.99))])
def test_a_resume_that_lost_only_the_optimizer_moments_is_not_told_as_training_from_scratch(tmp_path, seed, resume_at,
                                                                                           betas):
    resume_with_second_moments_scaled(tmp_path, seed=seed, resume_at=resume_at, steps=resume_at + 80, scale=0.0,
                                      betas=betas)
    resets = [i for i in spikedoc.analyze(tmp_path).incidents if i.cause == "state_reset"]
    assert any(i.verdict == "recovered" for i in resets), [(i.onset_step, i.verdict) for i in resets]
    for inc in resets:
        rollback = next(a for a in inc.recommendation["actions"] if a["action"] == "rollback")
        # The weights were loaded (the loss stayed on its trajectory): only the moments are not the run's.
        assert "from scratch" not in rollback["because"], rollback["because"]
        if inc.verdict == "recovered":
            assert "moments" in rollback["because"], rollback["because"]
            assert "had not recovered" not in rollback["because"], rollback["because"]


def test_a_rollback_for_a_loss_that_stayed_non_finite_says_so_not_only_where_the_judgement_stopped():
    inc = _first("nan")
    (rollback,) = [a for a in inc.recommendation["actions"] if a["action"] == "rollback"]
    assert inc.verdict == "divergence"
    assert rollback["because"].startswith("verdict divergence: the loss went non-finite and stayed so (still non-finite at step ")


def test_a_recovered_verdict_says_the_mean_shift_it_rests_on():
    # One step's excess in per-step sigmas can read as damage beside "no rollback needed"; the verdict
    # rests on the mean shift since recovery against its standard error, and says so.
    diagnosis = spikedoc.analyze(Path(__file__).resolve().parent.parent / "sample_runs" / "bad_batch_long")
    inc = next(i for i in diagnosis.incidents if i.verdict == "recovered" and i.damage.get("shift_steps"))
    because = next(a["because"] for a in inc.recommendation["actions"] if a["action"] == "none")
    assert f"over the {inc.damage['shift_steps']} steps since" in because
    assert "standard errors: below what counts as lasting damage" in because
