"""`spikedoc demo --guard`: the demo's planted fault is healed under spikedoc.Guard."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from spikedoc.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def healed_demo(tmp_path_factory):
    """`spikedoc demo --guard --fault nan`, run once for the tests of this module that read it."""
    out = tmp_path_factory.mktemp("healed") / "demo"
    return out, runner.invoke(app, ["demo", "--guard", "--fault", "nan", "--out", str(out)])


def test_demo_guard_rolls_back_a_nan_and_finishes_the_run(healed_demo):
    out, result = healed_demo
    tmp_path = out.parent
    assert result.exit_code == 0, result.output
    assert "vetoed 5 steps and rolled back 1 time" in result.output
    # Steps 200-204 vetoed (every loss NaN), step 205 the last healthy batches replayed on that state
    # (broken), steps 206-207 those and step 200's replayed on the checkpoint of step 150 (in band).
    assert "rollback from step 208 to 150 (vetoes, cause damage)" in " ".join(result.output.split())
    analysis = json.loads(runner.invoke(app, ["analyze", str(tmp_path / "demo"), "--json"]).output)
    [rollback] = [a for a in analysis["guard_actions"] if a["kind"] == "rollback"]
    assert rollback["step"] == 150 and rollback["detail"]["lr_scale"] == 0.7
    steps_after = analysis["summary"]["last_step"]
    assert steps_after == 299


def test_analyze_of_a_healed_run_records_what_the_guard_did_instead_of_advising_it_again(healed_demo):
    out, _ = healed_demo
    result = runner.invoke(app, ["analyze", str(out), "--json"])
    analysis = json.loads(result.output)
    [incident] = [i for i in analysis["incidents"] if i["onset_step"] == 200]
    assert incident["handled_by_guard"] and incident["recommendation"]["rollback"] is False
    assert [a["action"] for a in incident["recommendation"]["actions"]] == ["guard_handled"]
    assert "rolled back from step 208 to 150" in incident["recommendation"]["actions"][0]["because"]
    assert result.exit_code == 0 and not analysis["needs_attention"]  # healed: nothing left to do


def test_demo_guard_rejects_a_fault_it_does_not_plant(tmp_path):
    result = runner.invoke(app, ["demo", "--guard", "--fault", "lr_jump", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "unknown --fault 'lr_jump' with --guard" in " ".join(result.output.split())
    assert not (tmp_path / "d").exists()


def test_the_guarded_hook_script_heals_its_planted_nan_steps(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "hooks" / "guarded_torch.py"), "--run-dir", str(tmp_path / "run"),
                           "--steps", "60", "--checkpoint-every", "20", "--nan-at", "30"],
                          cwd=root, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 60 steps: 5 vetoed, 1 rollbacks" in done.stdout
    analysis = json.loads(runner.invoke(app, ["analyze", str(tmp_path / "run"), "--json"]).output)
    assert [a["step"] for a in analysis["guard_actions"] if a["kind"] == "rollback"] == [20]


def test_the_demos_long_bad_batch_is_vetoed_and_nothing_else_happens(tmp_path):
    from spikedoc.demo.guarded import guarded_run

    result = guarded_run(tmp_path / "run", "bad_batch_long")
    assert [(a["kind"], a["step"]) for a in result["actions"]] == [("veto", 170)]
    assert result["actions"][0]["sample_ids"][:2] == ["crawl/blob-0", "crawl/blob-1"]
    assert result["steps"] == 300 and result["rollbacks"] == 0


def test_a_second_moment_collapse_that_returns_on_every_replay_stops_as_recurring_after_one_rollback(tmp_path):
    import spikedoc
    from spikedoc.demo.guarded import guarded_run

    # Adam's exp_avg_sq zeroed every time step 150 is reached: the rollback's replay meets it again.
    with pytest.raises(spikedoc.GuardStopped, match="second moments collapsed again at step 150") as stopped:
        guarded_run(tmp_path / "run", "optimizer_state_returning")
    diagnosis = stopped.value.diagnosis
    [rollback] = diagnosis["actions"]
    assert diagnosis["reason"] == "recurring" and diagnosis["decision"]["cause"] == "optimizer_state"
    assert rollback["cause"] == "optimizer_state" and rollback["to_step"] == 100
    assert not rollback["skipped_positions"] and rollback["lr_scale"] == 1.0  # neither the data nor the LR blamed


def test_a_second_moment_collapse_planted_once_is_vetoed_and_rolled_back_and_the_replay_is_the_clean_run(tmp_path):
    from spikedoc.demo.guarded import guarded_run

    clean = guarded_run(tmp_path / "clean", None)
    healed = guarded_run(tmp_path / "healed", "optimizer_state")
    [veto, rollback] = healed["actions"]
    assert veto["kind"] == "veto" and veto["step"] == 150 and veto["reasons"] == ["optimizer_state_collapsed"]
    assert rollback["kind"] == "rollback" and rollback["cause"] == "optimizer_state" and rollback["to_step"] == 100
    assert healed["final_loss"] == clean["final_loss"]  # the replay from the good state is the clean run
