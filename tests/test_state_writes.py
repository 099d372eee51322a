"""Optimizer state written from outside the optimizer, anywhere in a run (`state_writes`): the exact
bounds on a first moment's growth and a second moment's fall hold on healthy real loops (full
statistics every step, or the cost budget's sparse ones), and a write breaks them where it happened,
told by `analyze` as a run-level finding when no incident names it."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import spikedoc
from spikedoc.analysis._meta import gradient_weight_decay, second_moment_decay
from spikedoc.analysis.state_writes import state_writes
from spikedoc.cli import app
from spikedoc.store import load
from tests.common.models import make_model, train

STEPS = 40


def _recorded(run_dir, make_optimizer, *, budget=None, write_at=None, write=None, seed=3, steps=STEPS):
    model = make_model(seed)
    opt = make_optimizer(model.parameters())
    monitor = spikedoc.watch(model, opt, run_dir=run_dir, budget=budget)

    def before_step(i):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if i == write_at:  # a writer from outside, before this step's update
            for state in opt.state.values():
                write(state)

    train(model, opt, steps, accumulate=2, before_step=before_step)
    monitor.close()
    return run_dir


def _writes(run_dir):
    run = load(run_dir)
    return state_writes(lambda lo, hi: run.layers(first_step=lo, last_step=hi), 0, int(run.steps["step"].max()),
                        gradient_weight_decay(run.meta), second_moment_decay(run.meta))


def _finding(run_dir):
    return next((f for f in spikedoc.analyze(run_dir).findings if f.id == "optimizer_state_written"), None)


HEALTHY = {
    "adam_beta2_0.95": lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "adamw_beta2_0.5": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.9, 0.5), weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=3e-3),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_a_healthy_run_breaks_no_bound_with_every_statistic_on_every_step(tmp_path, name):
    run_dir = _recorded(tmp_path / "run", HEALTHY[name])
    assert _writes(run_dir) == []
    diagnosis = spikedoc.analyze(run_dir)
    assert not [f for f in diagnosis.findings if f.id == "optimizer_state_written"]
    assert not [i for i in diagnosis.incidents if i.kind == "state_write" or i.cause == "optimizer_state"]


def test_a_healthy_run_breaks_no_bound_on_the_cost_budgets_sparse_statistics(tmp_path):
    run_dir = _recorded(tmp_path / "run", HEALTHY["adam_beta2_0.95"], budget=0.02, steps=80)
    layers = load(run_dir).layers()
    measured = layers.dropna(subset=["exp_avg_sq_mean"])["step"].nunique()
    assert 2 <= measured < 80  # the budget measured the state on some steps only
    assert _writes(run_dir) == []


def test_a_second_moment_scaled_down_is_a_write_at_that_step(tmp_path):
    def shrink(state):
        state["exp_avg_sq"].mul_(1e-3)

    run_dir = _recorded(tmp_path / "run", HEALTHY["adamw_beta2_0.5"], write_at=23, write=shrink)
    writes = _writes(run_dir)
    assert {w["step"] for w in writes} == {23}
    assert {w["moment"] for w in writes} == {"exp_avg_sq"}
    assert all(w["value"] < w["bound"] for w in writes)


def test_a_momentum_scaled_up_is_a_write_at_that_step(tmp_path):
    def grow(state):
        state["momentum_buffer"].mul_(5.0)

    run_dir = _recorded(tmp_path / "run", HEALTHY["sgd_momentum"], write_at=29, write=grow)
    writes = _writes(run_dir)
    assert {w["step"] for w in writes} == {29}
    assert all(w["moment"] == "momentum" and w["value"] > w["bound"] for w in writes)


def test_a_write_the_loss_does_not_show_is_an_incident_of_kind_state_write_at_its_step(tmp_path):
    def shrink(state):
        state["exp_avg_sq"].mul_(0.3)  # the loss does not spike

    run_dir = _recorded(tmp_path / "run", HEALTHY["adam_beta2_0.95"], write_at=31, write=shrink)
    diagnosis = spikedoc.analyze(run_dir)
    (incident,) = diagnosis.incidents
    assert (incident.kind, incident.onset_step, incident.cause) == ("state_write", 31, "optimizer_state")
    actions = [a["action"] for a in incident.recommendation["actions"]]
    assert "find_state_writer" in actions and not {"lower_lr", "tighten_clip"} & set(actions)
    assert _finding(run_dir) is None  # the incident names the write: no finding repeats it


def test_a_write_too_early_for_a_trajectory_is_a_finding_with_its_step(tmp_path):
    def shrink(state):
        state["exp_avg_sq"].mul_(0.3)

    run_dir = _recorded(tmp_path / "run", HEALTHY["adam_beta2_0.95"], write_at=5, write=shrink)
    assert not [i for i in spikedoc.analyze(run_dir).incidents if i.onset_step <= 5]
    finding = _finding(run_dir)
    assert finding is not None and finding.severity == "warning"
    assert "exp_avg_sq" in finding.message and "at step 5" in finding.message
    assert {w["step"] for w in finding.details["writes"]} == {5}


def test_the_quiet_line_warns_of_a_write_and_does_not_call_the_run_healthy(tmp_path):
    def shrink(state):
        state["exp_avg_sq"].mul_(0.3)

    run_dir = _recorded(tmp_path / "run", HEALTHY["adam_beta2_0.95"], write_at=5, write=shrink)
    result = CliRunner().invoke(app, ["analyze", str(run_dir), "--quiet"])
    assert result.exit_code == 0  # findings do not change the exit code (incidents do)
    (line,) = result.output.splitlines()
    assert "(40 steps): no incidents; " in line and line.endswith("optimizer_state_written"), line
    report = CliRunner().invoke(app, ["analyze", str(run_dir)], env={"COLUMNS": "200"}).output
    assert report.index("In the run") < report.index("optimizer_state_written")


def test_a_write_an_incident_already_names_is_not_told_again(tmp_path):
    def blow_up(state):
        state["momentum_buffer"].mul_(100.0)

    run_dir = _recorded(tmp_path / "run", HEALTHY["sgd_momentum"], write_at=29, write=blow_up)
    diagnosis = spikedoc.analyze(run_dir)
    named = {(p["name"], p.get("seen", p["step"])) for ctx in diagnosis.context
             for p in ctx.get("optimizer_precursors") or [] if p.get("overwritten")}
    assert named  # the incident the write caused names it
    finding = _finding(run_dir)
    told = set() if finding is None else {(w["name"], w["step"]) for w in finding.details["writes"]}
    assert not told & named


def test_a_resume_that_starts_fresh_moments_is_not_held_to_the_bound_across_segments(tmp_path):
    run_dir = tmp_path / "run"
    model = make_model(5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    monitor = spikedoc.watch(model, opt, run_dir=run_dir, budget=None)
    train(model, opt, 20, accumulate=2)
    monitor.close()
    fresh = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))  # the state not loaded
    monitor = spikedoc.watch(model, fresh, run_dir=run_dir, budget=None, start_step=20)
    train(model, fresh, 20, accumulate=2, start=20)
    monitor.close()
    assert _writes(run_dir) == []


def test_second_moments_of_optimizers_outside_adams_family_are_not_held_to_beta2():
    meta = {"optimizer": {"class": "torch.optim.adagrad.Adagrad", "groups": [{"params": ["w"]}]}}
    assert second_moment_decay(meta) == {}


def test_a_layer_table_too_large_to_scan_whole_is_said_and_its_writes_left_to_the_incidents(tmp_path, monkeypatch):
    def shrink(state):
        state["exp_avg_sq"].mul_(0.3)

    run_dir = _recorded(tmp_path / "run", HEALTHY["adam_beta2_0.95"], write_at=31, write=shrink)
    monkeypatch.setattr("spikedoc.analysis._pass._STATE_SCAN_BYTES", 1_000)  # this run's table is larger
    diagnosis = spikedoc.analyze(run_dir)
    assert any("not held to its bounds over the whole run" in w for w in diagnosis.warnings)
    assert not [i for i in diagnosis.incidents if i.kind == "state_write"]
    assert _finding(run_dir) is None


def test_bounds_broken_all_along_are_taken_as_an_optimizer_that_does_not_follow_its_rule(tmp_path):
    def shrink(state):
        state["exp_avg_sq"].mul_(0.3)

    model = make_model(3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", budget=None)

    def before_step(i):  # a custom step under a stock name: the moments shrink every other step
        if i % 2:
            for state in opt.state.values():
                shrink(state)

    train(model, opt, STEPS, before_step=before_step)
    monitor.close()
    diagnosis = spikedoc.analyze(tmp_path / "run")
    assert any("does not update its moments as its class's rule says" in w for w in diagnosis.warnings)
    assert not [i for i in diagnosis.incidents if i.kind == "state_write"]
    assert not [f for f in diagnosis.findings if f.id == "optimizer_state_written"]
