"""Specification of `spikedoc.analyze`: inputs it accepts, the Diagnosis it returns, and what it reads."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import spikedoc
from spikedoc.analysis import AnalysisConfig, DetectorConfig, Diagnosis, analyze
from spikedoc.analysis.state_writes import STATE_BOUND_COLUMNS
from spikedoc.errors import RunFormatError
from spikedoc.store.reader import load
from tests.common.planted import adamw_meta, healthy_layers, healthy_steps, write_run

T = 400


@pytest.fixture
def spiky(tmp_path):
    steps = healthy_steps()
    steps.loc[T, "distinct_token_ratio"] = 0.02
    steps.loc[T : T + 10, "loss"] *= 1.6
    return write_run(tmp_path / "spiky", steps, healthy_layers(steps))


def test_analyze_is_the_public_spikedoc_analyze():
    assert spikedoc.analyze is analyze and spikedoc.Diagnosis is Diagnosis


def test_a_clean_run_is_healthy(tmp_path):
    steps = healthy_steps()
    diagnosis = analyze(write_run(tmp_path / "run", steps, healthy_layers(steps)))
    assert diagnosis.healthy and diagnosis.incidents == [] and diagnosis.findings == []
    assert diagnosis.spike_score["loss"] == 0.0 and 0.0 <= diagnosis.spike_score["grad_norm"] < 0.01
    assert diagnosis.missing == [] and diagnosis.source == "spikedoc"


def test_to_dict_has_the_documented_stable_shape_and_is_plain_json(spiky):
    data = json.loads(json.dumps(analyze(spiky).to_dict(), allow_nan=False))
    assert {"format", "path", "source", "healthy", "summary", "spike_score", "incidents", "findings", "missing",
            "warnings"} <= set(data)
    assert data["healthy"] is False and set(data["spike_score"]) == {"loss", "grad_norm"}
    incident = data["incidents"][0]
    assert {"onset_step", "peak_step", "end_step", "recovered", "kind", "cause", "magnitude_sigma", "batches", "layers",
            "recommendation", "segment", "evidence", "precursor_lead_steps", "context"} <= set(incident)
    assert {"step", "sample_ids", "anomalies"} <= set(incident["batches"][0])
    assert {"rollback_to_step", "lr_factor", "clip_max_norm", "skip_steps", "skip_sample_ids"} <= set(incident["recommendation"])
    assert incident["cause"] == "bad_batch" and incident["recommendation"]["skip_steps"] == [T]


def test_layer_entries_carry_name_z_and_lead(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    steps.loc[T - 3 : T, "grad_norm"] *= 2.0 ** np.arange(1, 5)
    layers.loc[(layers["name"] == "head.weight") & layers["step"].between(T - 3, T), "grad_norm"] *= 2.0 ** np.arange(1, 5)
    steps.loc[T : T + 20, "loss"] *= 1.6
    data = analyze(write_run(tmp_path / "run", steps, layers)).to_dict()
    layer = data["incidents"][0]["layers"][0]
    assert layer["name"] == "head.weight" and layer["module"] == "head"
    assert layer["z"] > 6 and layer["lead_steps"] >= 1


def test_the_layer_table_is_read_whole_only_for_the_optimizer_state_bounds_columns(tmp_path):
    steps = healthy_steps(n=3000)
    steps.loc[2500 : 2510, "loss"] *= 1.5
    run = load(write_run(tmp_path / "run", steps, healthy_layers(steps)))
    reads, read = [], run.layers

    def recorded(first_step=None, last_step=None, names=None, *, columns=None):
        frame = read(first_step, last_step, names, columns=columns)
        reads.append((columns, dict(run.layer_scan)))
        return frame

    run.layers = recorded
    diagnosis = analyze(run)
    assert [i.onset_step for i in diagnosis.incidents] == [2500]
    every_column = [scan for columns, scan in reads if columns is None]
    assert every_column and all(scan["row_groups"] < scan["row_groups_total"] / 2 for scan in every_column), reads
    assert {columns for columns, _ in reads} == {None, STATE_BOUND_COLUMNS}


def test_a_csv_log_is_analysed_with_the_attribution_its_data_allows(tmp_path):
    steps = healthy_steps()
    steps.loc[T : T + 10, "loss"] *= 1.6
    path = tmp_path / "train.csv"
    steps[["step", "loss", "grad_norm", "lr"]].to_csv(path, index=False)
    diagnosis = analyze(path)
    assert diagnosis.source == "csv"
    assert [i.onset_step for i in diagnosis.incidents] == [T]
    assert {"layers", "batch fingerprints", "events"} <= set(diagnosis.missing)
    assert diagnosis.incidents[0].recommendation["checkpoint_known"] is False


def test_a_tensorboard_log_dir_is_analysed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    steps = healthy_steps()
    steps.loc[T : T + 10, "loss"] *= 1.6
    writer = SummaryWriter(str(tmp_path / "tb"))
    for row in steps.itertuples():
        writer.add_scalar("train/loss", row.loss, row.step)
        writer.add_scalar("train/grad_norm", row.grad_norm, row.step)
        writer.add_scalar("train/learning_rate", row.lr, row.step)
    writer.close()
    diagnosis = analyze(tmp_path / "tb")
    assert diagnosis.source == "tensorboard"
    assert [i.onset_step for i in diagnosis.incidents] == [T]
    assert diagnosis.context[0]["lr_at_onset"] == pytest.approx(steps.loc[T, "lr"], rel=1e-5)


def test_a_detector_config_is_accepted_in_place_of_an_analysis_config(spiky):
    assert analyze(spiky, config=DetectorConfig(threshold=1e6)).healthy  # nothing is that far off
    assert not analyze(spiky, config=AnalysisConfig(detector=DetectorConfig())).healthy


def test_a_run_with_neither_a_finite_loss_nor_a_finite_grad_norm_is_unusable_input(tmp_path):
    steps = healthy_steps(n=50)
    steps["loss"] = np.nan
    steps["grad_norm"] = np.nan
    with pytest.raises(RunFormatError, match="neither a loss nor a grad norm with a finite value"):
        analyze(write_run(tmp_path / "run", steps))


@pytest.mark.parametrize("how", ["nan", "no_column"])
def test_a_run_without_a_loss_is_analysed_on_its_grad_norm_and_says_what_it_could_not_do(tmp_path, how):
    steps = healthy_steps()
    steps.loc[T, "grad_norm"] *= 40
    steps = steps.assign(loss=np.nan) if how == "nan" else steps.drop(columns="loss")
    diagnosis = analyze(write_run(tmp_path / "run", steps, healthy_layers(steps)))
    assert [(i.kind, i.onset_step, i.metric) for i in diagnosis.incidents] == [("grad_spike", T, "grad_norm")]
    assert diagnosis.incidents[0].layers, "the layers are still attributed"
    assert not any("the loss did not react" in sentence for sentence in diagnosis.incidents[0].evidence)
    assert "loss" in diagnosis.missing and diagnosis.spike_score["loss"] is None
    assert any(w.startswith("no finite loss recorded: incidents are found on the grad norm alone") for w in diagnosis.warnings)


def test_a_grad_norm_column_without_a_finite_value_is_named_missing(tmp_path):
    steps = healthy_steps()
    steps["grad_norm"] = np.nan
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    assert diagnosis.healthy and "grad_norm" in diagnosis.missing and diagnosis.spike_score["grad_norm"] is None


def test_a_short_log_says_its_history_is_too_short_for_a_confident_baseline(tmp_path):
    path = tmp_path / "short.csv"
    pd.DataFrame({"step": range(12), "loss": [3.0, 3.01, 2.99, 3.0, 3.02, 9.0, 3.0, 2.98, 3.0, 3.01, 3.0, 2.99]}).to_csv(path, index=False)
    diagnosis = analyze(path)
    assert diagnosis.incidents[0].low_confidence
    assert any("fewer than the" in w and "confident baseline" in w for w in diagnosis.warnings)


def test_a_bad_batch_on_one_rank_is_attributed_to_that_rank(tmp_path):
    meta = adamw_meta(world_size=2)
    rank0, rank1 = healthy_steps(seed=0), healthy_steps(seed=1)
    rank1.loc[T, "distinct_token_ratio"] = 0.01
    rank1.loc[T : T + 5, "loss"] *= 2.0
    write_run(tmp_path / "run", rank0, meta=meta, rank=0, segment=0)
    write_run(tmp_path / "run", rank1, meta=meta, rank=1, segment=0)
    diagnosis = analyze(tmp_path / "run")
    inc = diagnosis.incidents[0]
    assert inc.cause == "bad_batch" and diagnosis.summary["ranks"] == 2
    assert [(b["rank"], b["step"]) for b in inc.batches if b["anomalies"]] == [(1, T)]
    assert any(e.startswith(f"batch at step {T}, rank 1:") for e in inc.evidence)


def test_a_real_training_run_recorded_by_watch_is_diagnosed(tmp_path):
    import torch

    from tests.common.models import char_text, make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is fastest on one thread, and the machine is shared
    try:
        model = make_model(seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.01)
        monitor = spikedoc.watch(model, optimizer, run_dir=tmp_path / "run", clip=1.0)
        data = char_text()
        for step in range(130):
            for group in optimizer.param_groups:
                group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
            ids, labels = data.batch(step)
            if step == 100:  # a zero-filled shard: every token the same
                ids, labels = torch.full_like(ids, 5), torch.full_like(labels, 5)
            model(ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if (step + 1) % 25 == 0:
                monitor.event("checkpoint", path=f"ckpt-{step + 1}.pt")  # holds the state before step + 1
        monitor.close()
    finally:
        torch.set_num_threads(threads)
    diagnosis = analyze(tmp_path / "run")
    inc = diagnosis.incidents[0]
    assert (inc.onset_step, inc.cause) == (100, "bad_batch")
    assert inc.recommendation["skip_steps"] == [100]
    # Recovered: nothing to roll back, so no rollback target is named (a skip replays from where it is).
    assert inc.verdict == "recovered" and inc.recommendation["rollback"] is False
    assert (inc.recommendation["rollback_to_step"], inc.recommendation["checkpoint_path"]) == (None, None)
    assert [f.id for f in diagnosis.findings] == ["adam_coupled_weight_decay", "decay_on_bias_and_norm"]
    assert diagnosis.missing == []


def test_a_real_run_whose_model_returns_logits_is_analysed_on_its_grad_norm(tmp_path):
    # The loop computes the loss outside forward and never records it; one batch's gradient is
    # planted 30x too large. The run has no loss curve, and still gets its incident.
    import torch

    from tests.common.models import char_text, lm_loss, make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(seed=0, logits_only=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with pytest.warns(UserWarning, match="ended with no loss"):
            with spikedoc.watch(model, optimizer, run_dir=tmp_path / "run"):
                for step in range(120):
                    ids, labels = char_text().batch(step)
                    lm_loss(model(ids), labels).backward()
                    if step == 90:
                        for p in model.parameters():
                            p.grad.mul_(30.0)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)  # never bites, but is in use
                    optimizer.step()
                    optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    diagnosis = analyze(tmp_path / "run")
    assert [(i.onset_step, i.kind) for i in diagnosis.incidents] == [(90, "grad_spike")]
    assert "loss" in diagnosis.missing and "no_clipping" not in [f.id for f in diagnosis.findings]
    assert diagnosis.incidents[0].layers, "the tensors are attributed without a loss"
