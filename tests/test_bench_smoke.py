"""Smoke test of bench/overhead.py: every variant trains and is measured (no timing assertions)."""

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
