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


def test_report_size_benchmark_reports_a_section_per_planted_spike(tmp_path, capsys):
    from bench.report_size import main

    assert main(["--steps", "2000", "--tensors", "4", "--cache", str(tmp_path), "--no-write"]) == 0
    table_row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " MB |" in line]
    assert len(table_row) == 1 and "| 4/4 |" in table_row[0], table_row
