"""watch(budget=...): exact gradient norms every step, the full statistics on a cadence, dense again after a spike."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spikedoc.monitor.budget import Cadence
from tests.common.brute import watched_run
from tests.common.models import make_model

ROOT = Path(__file__).resolve().parent.parent


def test_every_step_keeps_exact_gradient_norms_and_full_steps_keep_everything(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A tiny model's step is a few ms, so the full statistics cost far more than 1% of it: sparse.
    run, copies = watched_run(model, opt, tmp_path, 40, watch={"budget": 0.01})
    steps, layers = run.steps, run.layers()
    full = steps.set_index("step")["full_stats"]
    assert full.iloc[:10].all() and not full.iloc[10:].all(), "dense while warming up, then on a cadence"
    assert steps.loc[~steps["full_stats"], "update_norm"].isna().all()
    for step, c in enumerate(copies):
        rows = layers[layers["step"] == step].set_index("name")
        brute = {n: float(g.double().norm()) for n, g in c.grads.items()}
        assert rows["grad_norm"].to_dict() == pytest.approx(brute, rel=1e-5)  # every step
        assert steps["grad_norm"][step] == pytest.approx(c.total_grad_norm, rel=1e-5)
        if full[step]:
            m = {n: float(s["exp_avg"].double().norm()) for n, s in c.state.items()}
            assert rows["exp_avg_norm"].to_dict() == pytest.approx(m, rel=1e-5)
            update = math.sqrt(sum(float((c.after[n] - c.before[n]).double().pow(2).sum()) for n in c.after))
            assert steps["update_norm"][step] == pytest.approx(update, rel=1e-4)
            params = {n: float(p.double().norm()) for n, p in c.after.items()}
            assert rows["param_norm"].to_dict() == pytest.approx(params, rel=1e-5)
        else:
            assert rows[["exp_avg_norm", "eps_frac", "grad_max", "update_ratio"]].isna().all().all()


def test_light_steps_measure_no_parameter_norms(tmp_path):
    # Parameters move slowly: their norms (one pass over every weight) wait for a full step.
    model = make_model(1)
    run, _ = watched_run(model, torch.optim.Adam(model.parameters(), lr=1e-3), tmp_path, 30, watch={"budget": 0.01})
    steps, layers = run.steps.set_index("step"), run.layers()
    light = steps.index[~steps["full_stats"]]
    assert len(light) > 0
    assert steps.loc[light, "param_norm"].isna().all()
    assert layers.loc[layers["step"].isin(light), "param_norm"].isna().all()
    assert steps.loc[steps["full_stats"], "param_norm"].notna().all()


def test_time_between_steps_does_not_widen_the_budget(tmp_path):
    # A pause before each step (a slow data loader, another job's work in the same process) is not
    # the step's own time: counted, it would make every step full on this tiny model.
    import spikedoc
    import time

    from tests.common.models import char_text

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # 5% of a 0.3 s pause would pay for the full statistics on every step; 5% of the step does not.
    monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", budget=0.05)
    data = char_text().batches()
    for _ in range(20):
        time.sleep(0.3)
        input_ids, labels = next(data)
        model(input_ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    monitor.close()
    steps = spikedoc.load(tmp_path / "run").steps.set_index("step")
    assert (steps["step_time"].iloc[1:] >= 0.3).all(), "the recorded step time still counts the pause"
    assert not steps["full_stats"].iloc[10:].all(), "the pause widened the budget"


def test_default_records_the_full_statistics_every_step(tmp_path):
    model = make_model(0)
    run, _ = watched_run(model, torch.optim.AdamW(model.parameters(), lr=1e-3), tmp_path, 3)
    assert run.steps["full_stats"].all() and run.steps["update_norm"].notna().all()


def test_a_flagged_spike_makes_the_following_steps_full():
    cadence = Cadence(budget=0.01, max_every=50, dense_steps=20, warm_steps=0)
    plan = []
    for step in range(200):
        plan.append(cadence.full(step))
        loss = 3.0 + 0.01 * (step % 3) + (3.0 if step == 150 else 0.0)
        # Full steps cost 10 ms, light ones 0.1 ms, of a 100 ms step: far over a 1% budget when full.
        cadence.observe({"step": step, "loss": loss, "grad_norm": 1.0}, full=plan[-1],
                        cost=0.01 if plan[-1] else 0.0001, step_time=0.1)  # fmt: skip
    assert cadence.every > 1 and sum(plan[100:150]) < 10
    assert all(plan[151:171]), "dense for dense_steps after the flagged step"


def test_a_cadence_whose_caller_flags_spikes_runs_no_detector_and_densifies_when_told():
    cadence = Cadence(budget=0.01, max_every=50, dense_steps=20, warm_steps=0)
    cadence.detects_spikes = False  # what Monitor.leave_spike_detection_to_caller() sets
    plan = []
    for step in range(200):
        plan.append(cadence.full(step))
        if step == 180:
            cadence.densify(step + 1)  # the caller's own flag
        loss = 3.0 + 0.01 * (step % 3) + (3.0 if step == 150 else 0.0)
        cadence.observe({"step": step, "loss": loss, "grad_norm": 1.0}, full=plan[-1],
                        cost=0.01 if plan[-1] else 0.0001, step_time=0.1)  # fmt: skip
    assert not all(plan[151:171]), "the spike in the rows was not the cadence's to judge"
    assert all(plan[181:200])


def test_budget_must_be_a_share_of_the_step():
    import spikedoc

    with pytest.raises(ValueError, match="budget"):
        spikedoc.watch(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), budget=2.0)
    assert np.isclose(Cadence(budget=0.5).budget, 0.5)



def test_a_budget_brings_the_streaming_detector_and_nothing_else_of_the_analysis(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch, spikedoc
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = spikedoc.watch(model, opt, run_dir={str(tmp_path / "run")!r}, budget=0.02)
        for _ in range(3):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step(); opt.zero_grad()
        monitor.close()
        print(" ".join(sorted(m for m in sys.modules if m.startswith(("spikedoc.analysis", "spikedoc.detector.")))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "spikedoc.detector.streaming" in loaded
    assert not any(m.startswith("spikedoc.analysis") for m in loaded), loaded
