"""Smoke tests of the benchmarks at tiny sizes: they run and measure what they claim (no timing assertions)."""

from __future__ import annotations

import importlib.util

import spikedoc
from bench.overhead import VARIANTS, BenchConfig, run_benchmark


def test_overhead_benchmark_measures_every_variant_on_identical_training(tmp_path):
    variants = tuple(v for v in VARIANTS if v != "wandb" or importlib.util.find_spec("wandb") is not None)
    cfg = BenchConfig(
        n_layer=1,
        n_head=2,
        d_model=32,
        seq_len=32,
        batch_size=4,
        rounds=2,
        steps=3,
        warmup=1,
        variants=variants,
    )

    result = run_benchmark(cfg, work_dir=tmp_path)

    baseline_losses = result.results["baseline"].final_losses
    for name in variants:
        res = result.results[name]
        assert res.unavailable is None, f"{name}: {res.unavailable}"
        assert [len(times) for times in res.step_times] == [cfg.steps] * cfg.rounds, name
        # Observers observe: every variant must have trained exactly the baseline's trajectory.
        assert res.final_losses == baseline_losses, name
    run = spikedoc.load(result.results["spikedoc"].run_dirs[0])
    assert run.steps["step"].tolist() == list(range(cfg.warmup + cfg.steps))
    assert run.layers()["name"].nunique() == result.n_tensors


def test_analyze_scale_benchmark_finds_every_planted_spike_in_a_small_generated_run(tmp_path):
    from bench.analyze_scale import ScaleConfig, cached_run, match_spikes, time_analyze

    cfg = ScaleConfig(steps=2_000, tensors=10)
    run_dir, info = cached_run(cfg, tmp_path)

    run = spikedoc.load(run_dir)
    assert run.steps["step"].tolist() == list(range(cfg.steps))
    assert info["tables"]["layers"] == {"parts": 20, "rows": 20_000, "bytes": info["tables"]["layers"]["bytes"]}
    assert (run.events["kind"] == "checkpoint").sum() == 99
    assert cached_run(cfg, tmp_path)[1] == info  # cached: not generated again
    (result,) = time_analyze(run_dir, repeats=1)
    matches = match_spikes(info["spikes"], result["diagnosis"])
    assert [m["incident"] is not None for m in matches] == [True] * len(info["spikes"]), matches
    assert result["exit_code"] == 1 and result["peak_rss_mb"] > 0


def test_guard_recovery_quick_has_every_fault_and_method_with_finite_numbers(capsys):
    import math

    from bench.guard_recovery import FAULTS, METHODS, TIMED, main

    report = main(["--quick"])

    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
            for line in report.splitlines() if line.startswith("| ")}  # fmt: skip
    zclip = importlib.util.find_spec("zclip") is not None
    for fault in FAULTS:
        for method in METHODS:
            cells = rows[fault, method]
            if method == "zclip" and not zclip:
                assert cells[2] == "not run" and "zclip" in cells[-1]
                continue
            if cells[2] == "NaN (diverged)":  # an unprotected run a NaN step killed: a result, not a failure
                assert method != "guard" and fault != "clean", cells
                continue
            assert math.isfinite(float(cells[2])), cells
            assert math.isfinite(float(cells[3].rstrip("%"))), cells
            assert int(cells[4].split()[0]) >= 0 and int(cells[5]) >= 0, cells
    for variant in TIMED:
        line = next(line for line in report.splitlines() if line.startswith(f"| {variant} |"))
        assert all(math.isfinite(float(c)) for c in line.split("|")[2:4]), line
    assert "Command: `python bench/guard_recovery.py --quick`" in report


def test_report_size_benchmark_reports_a_section_per_planted_spike(tmp_path, capsys):
    from bench.report_size import main

    assert main(["--steps", "2000", "--tensors", "4", "--cache", str(tmp_path), "--no-write"]) == 0
    table_row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " MB |" in line]
    assert len(table_row) == 1 and "| 4/4 |" in table_row[0], table_row


def test_guard_loops_run_at_toy_size_clean_untouched_and_a_nan_batch_vetoed(tmp_path):
    import math

    from bench._guard_loops import HEALABLE, LOOPS, LoopConfig, train_loop
    from bench._guard_recovery_report import format_loops_report

    cfg = LoopConfig(steps=12, fault_step=6, checkpoint_every=4, batch=2, block=8, stretch=2, surge_steps=2,
                     eval_batches=1, eval_interval=6)  # fmt: skip
    results = {}
    for loop in LOOPS:
        plain = train_loop(cfg, loop, "clean", guarded=False, work_dir=tmp_path)
        guarded = train_loop(cfg, loop, "clean", guarded=True, work_dir=tmp_path)
        results[loop, "clean", False], results[loop, "clean", True] = plain, guarded
        assert math.isfinite(plain.eval_loss), loop
        # Nothing to veto: the guard observes (nanogpt keeps its own clip; masked's clip is the guard's, the same norm).
        assert guarded.eval_loss == plain.eval_loss, loop
        assert (guarded.vetoes, guarded.rollbacks, guarded.outcome) == (0, 0, "finished"), loop
        broken = results[loop, "nan_batch", False] = train_loop(cfg, loop, "nan_batch", guarded=False, work_dir=tmp_path)
        assert math.isnan(broken.eval_loss), loop
        healed = results[loop, "nan_batch", True] = train_loop(cfg, loop, "nan_batch", guarded=True, work_dir=tmp_path)
        assert healed.vetoes == 1 and math.isfinite(healed.eval_loss), (loop, healed)

    report = format_loops_report(cfg, results, "python bench/guard_recovery.py --loops", 1.0, healable=HEALABLE)
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith(("| nanogpt", "| masked"))]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [(loop, f) for loop in LOOPS for f in ("clean", "nan_batch")]
    assert all(r[7] == "yes" for r in rows if r[1] == "clean"), rows


def test_guard_replay_exam_reads_a_nan_loss_as_numerics_on_a_small_exam_run(tmp_path):
    from bench._exam_train import Fault, Setup
    from bench.guard_replay_exam import guard_cause, train_guarded

    run = train_guarded(Setup(seed=1, steps=24), Fault(family="nonfinite", kind="loss_nan", step=12), tmp_path)

    assert [a["kind"] for a in run["actions"]] == ["veto"] and run["actions"][0]["step"] == 12
    assert guard_cause(run["actions"], None) == ("numerics", "untested") and run["outcome"] == "finished"
    assert len(run["cost"]["step"]) == 24 and run["checkpoint_bytes"] > run["param_bytes"] > 0


def test_guard_cause_is_the_class_the_guard_tested_else_its_actions_name_else_the_doctors():
    from bench.guard_replay_exam import guard_cause

    veto = {"kind": "veto", "reasons": ["loss_out_of_band"]}
    rollback = {"kind": "rollback", "cause": "damage", "evidence": {}}
    assert guard_cause([], None) == ("none", "none")
    assert guard_cause([{"kind": "veto", "reasons": ["nonfinite"]}], None) == ("numerics", "untested")
    assert guard_cause([veto], "optimizer_state") == ("data", "untested")  # its own action first
    assert guard_cause([*[veto] * 5, {**rollback, "cause": "lr_schedule"}], None) == ("schedule", "untested")
    assert guard_cause([rollback, {**rollback, "evidence": {"cause_test": {"found": "state"}}}], None) == ("state", "tested")
    assert guard_cause([*[veto] * 5, rollback], "lr_too_high") == ("schedule", "analyze")  # nothing named: the doctor's
    assert guard_cause([*[veto] * 5, rollback], None) == ("damage", "untested")
    not_data = {**rollback, "evidence": {"cause_test": {"found": "not_data", "replays": [{"replay": "same_batches", "found": "not_data"}]}}}
    assert guard_cause([not_data], "bad_batch") == ("damage", "untested")  # the doctor's cause, ruled out by a replay


def test_soup_rule_restores_the_last_checkpoint_and_halves_the_lr_on_a_loss_spike():
    import torch

    from bench.guard_recovery_frameworks import SoupRule

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    rule = SoupRule(every=5, window=4)
    saved = None
    for step in range(1, 11):  # healthy steps; the state of step 10 is the last checkpoint
        with torch.no_grad():
            model.weight.add_(1.0)
        assert rule.after_step(step, 1.0, model, opt, sched) is None
        if step == 10:
            saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(100.0)
    assert rule.after_step(11, 1.0, model, opt, sched) is None  # an ordinary loss: no action
    assert rule.after_step(12, 2.5, model, opt, sched) == 10  # above twice the recent mean: back to 10
    assert torch.equal(model.weight, saved)
    assert opt.param_groups[0]["lr"] == 0.05 and sched.base_lrs == [0.05]
    for step in range(11, 16):  # healthy again: the state of step 15 is saved with the LR halved
        assert rule.after_step(step, 1.0, model, opt, sched) is None
    assert rule.after_step(16, 9.0, model, opt, sched) == 15
    assert opt.param_groups[0]["lr"] == 0.025  # halved once more, not twice
