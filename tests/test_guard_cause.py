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
    """Positions 65-84 of the data order are garbage: one rollback, then three probes and data skips."""
    root = tmp_path_factory.mktemp("stretch")
    _, clean = run_guarded(root / "clean", steps=110, checkpoint_every=20)
    run_guarded(root / "run", steps=110, checkpoint_every=20, fault=_corrupt_data(clean[65:85]))
    return root / "run"


def _actions(run_dir, kind):
    result = _analyze(run_dir, "--json")
    assert "Traceback" not in result.output
    return [a for a in json.loads(result.output)["guard_actions"] if a["kind"] == kind]


def test_a_data_skip_is_confirmed_by_the_same_data_and_by_the_last_healthy_batches_replayed(corrupt_stretch_run):
    skips = _actions(corrupt_stretch_run, "data_skip")
    assert len(skips) == 3
    for skip in skips:
        assert skip["cause"]["status"] == "confirmed" and skip["cause"]["found"] == "data"
        assert [r["replay"] for r in skip["cause"]["replays"]] == ["same_batches", "other_batches"]


def test_each_probe_is_recorded_as_a_replay_event_with_what_it_found(corrupt_stretch_run):
    replays = _actions(corrupt_stretch_run, "replay")
    skips = _actions(corrupt_stretch_run, "data_skip")
    assert [r["detail"]["found"] for r in replays] == ["data"] * 3
    assert [r["step"] for r in replays] == [s["detail"]["cause_test"]["probe_step"] for s in skips]


def test_the_first_rollback_and_the_vetoes_of_a_corrupt_stretch_are_inferred(corrupt_stretch_run):
    [rollback] = _actions(corrupt_stretch_run, "rollback")
    assert rollback["cause"] == {"status": "inferred", "replays": [], "found": "damage"}
    assert {v["cause"]["status"] for v in _actions(corrupt_stretch_run, "veto")} == {"inferred"}


def test_the_terminal_report_words_the_replay_that_confirmed_a_cause(corrupt_stretch_run):
    result = _analyze(corrupt_stretch_run)
    assert "Traceback" not in result.output
    assert ("cause confirmed by replay (the same data replayed from a good state: data; the last healthy batches "
            "replayed on the vetoed state: data): the data") in result.output
    assert "(vetoes, cause damage)" in result.output and "cause inferred (damage), not replayed" in result.output
    first = _actions(corrupt_stretch_run, "replay")[0]
    where = ", ".join(str(x) for x in first["detail"]["probe_positions"])
    assert f"replay at step {first['step']} (other batches, positions {where}): found the data at fault" in result.output


def test_the_html_report_has_each_actions_cause(corrupt_stretch_run, tmp_path):
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(corrupt_stretch_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<th>cause</th>" in page and page.count("cause confirmed by replay") == 3


def test_a_fault_that_returns_after_its_rollback_is_confirmed_from_a_good_checkpoint(tmp_path):
    always = nan_grads(set(range(30, 10_000)), first_pass_only=False)
    with pytest.raises(spikedoc.GuardStopped):
        run_guarded(tmp_path, steps=200, checkpoint_every=20, max_rollbacks=2, after_backward=always)
    rollbacks = _actions(tmp_path, "rollback")
    assert [r["cause"]["status"] for r in rollbacks] == ["inferred", "confirmed"]
    assert rollbacks[1]["cause"]["replays"] == [{"replay": "from_good_checkpoint", "found": "state"}]
    [stop] = _actions(tmp_path, "guard_stop")
    assert stop["detail"]["reason"] == "recurring" and stop["cause"]["found"] == "state"
