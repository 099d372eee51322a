"""Specification of batch and layer attribution and of optimizer-state precursors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spikedoc
from spikedoc.analysis._meta import parameter_modules
from spikedoc.analysis.attribution import (
    attribute_batches,
    attribute_layers,
    batch_profile,
    hash_history,
    module_kind,
    module_kinds,
)
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.report.terminal import action_text
from tests.common.planted import MODULE_TYPES, healthy_layers, healthy_steps
from tests.common.resumes import resume_then_bad_batch

T = 400


@pytest.fixture
def steps():
    return healthy_steps()


def _batch(steps, step=T):
    rows = steps.loc[steps["step"] == step]
    return attribute_batches(rows, profile=batch_profile(steps), hashes=hash_history(steps))[0]


# ------------------------------------------------------------------------------------ batches


def test_a_normal_batch_has_no_anomaly_anywhere_in_a_clean_run(steps):
    batches = attribute_batches(steps, profile=batch_profile(steps), hashes=hash_history(steps))
    assert [b["step"] for b in batches if b["anomalies"]] == []


def test_long_sequences_are_reported_as_a_ratio_to_the_run_median(steps):
    steps.loc[T, "seq_len_median"] = 310.0
    batch = _batch(steps)
    assert len(batch["anomalies"]) == 1
    assert batch["anomalies"][0].startswith("median sequence length 310 is 3.1x the run's median (")
    assert batch["flags"] == ["high_seq_len_median"]


def test_near_constant_input_is_named_by_its_distinct_token_ratio(steps):
    steps.loc[T, "distinct_token_ratio"] = 0.02
    assert _batch(steps)["anomalies"] == ["distinct-token ratio 0.02: near-constant input (run's median 0.6)"]


def test_high_entropy_input_is_named_by_its_distinct_token_ratio(steps):
    steps.loc[T, "distinct_token_ratio"] = 0.95
    batch = _batch(steps)
    assert batch["flags"] == ["high_distinct_token_ratio"]
    assert batch["anomalies"] == ["distinct-token ratio 0.95 is 1.6x the run's median (0.6): high-entropy input "
                                  "(random, binary or garbled data?)"]


def test_a_healthy_spread_of_distinct_token_ratios_is_not_anomalous(steps):
    batches = attribute_batches(steps, profile=batch_profile(steps), hashes=hash_history(steps))
    assert not [b for b in batches if "high_distinct_token_ratio" in b["flags"]]


def test_a_repeated_content_hash_names_the_step_it_was_first_seen(steps):
    steps.loc[T, "batch_hash"] = steps.loc[123, "batch_hash"]
    batch = _batch(steps)
    assert batch["repeat_of_step"] == 123
    assert batch["anomalies"] == ["content hash seen before at step 123: repeated data"]


def test_repeats_are_not_anomalous_in_a_run_that_repeats_its_data(steps):
    steps["batch_hash"] = [f"h{s % 100}" for s in steps["step"]]  # six epochs over 100 batches
    batch = _batch(steps)
    assert batch["repeat_of_step"] == T % 100 and batch["anomalies"] == []


def test_the_worst_samples_are_named_and_an_outlier_sample_is_singled_out(steps):
    losses = [2.0, 2.1, 1.9, 12.0, 2.05, 1.95, 2.2, 2.0]
    steps.at[T, "sample_losses"] = losses
    batch = _batch(steps)
    assert [w["id"] for w in batch["worst_samples"]] == [f"doc-{T * 8 + 3}", f"doc-{T * 8 + 6}", f"doc-{T * 8 + 1}"]
    assert batch["outlier_sample_ids"] == [f"doc-{T * 8 + 3}"]
    assert batch["anomalies"][0].startswith(f"sample doc-{T * 8 + 3} has loss 12, 5.9x the batch's median sample loss (2.02)")


def test_stream_positions_stand_in_for_sample_ids_when_none_were_given(steps):
    steps["sample_ids"] = None
    batch = _batch(steps)
    assert batch["sample_ids"] == [] and batch["positions"] == [T * 8, T * 8 + 8]


def test_a_run_without_fingerprints_attributes_nothing_and_fails_nothing():
    import pandas as pd

    frame = pd.DataFrame({"step": range(100), "loss": 2.0})
    batch = attribute_batches(frame.tail(1), profile=batch_profile(frame), hashes=hash_history(frame))[0]
    assert batch["anomalies"] == [] and batch["positions"] is None and batch["stats"] == {}


# ------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("name", "module_type", "kind"),
    [
        ("transformer.wte.weight", "Embedding", "embeddings"),
        ("model.embed_tokens.weight", None, "embeddings"),
        ("transformer.h.0.attn.c_attn.weight", "Linear", "attention"),
        ("model.layers.3.self_attn.q_proj.weight", None, "attention"),
        ("transformer.h.0.mlp.c_fc.weight", "Linear", "mlp"),
        ("model.layers.3.mlp.down_proj.weight", None, "mlp"),
        ("transformer.h.0.ln_1.weight", "LayerNorm", "norms"),
        ("model.layers.3.input_layernorm.weight", None, "norms"),
        ("model.norm.weight", "LlamaRMSNorm", "norms"),
        ("lm_head.weight", "Linear", "head"),
        ("something.else", None, "other"),
    ],
)
def test_module_kind_groups_parameters_by_type_and_name(name, module_type, kind):
    assert module_kind(name, module_type) == kind


def test_the_tensor_that_departed_first_leads_and_is_grouped_by_module(steps):
    layers = healthy_layers(steps)
    fc = (layers["name"] == "h.0.mlp.fc.weight") & layers["step"].between(T - 12, T)
    layers.loc[fc, "grad_norm"] *= 1.6 ** np.arange(1, 14)
    qkv = (layers["name"] == "h.0.attn.qkv.weight") & layers["step"].between(T - 2, T)
    layers.loc[qkv, "grad_norm"] *= 5
    found = attribute_layers(layers, onset=T - 3, peak=T, reference=T, module_types=MODULE_TYPES)
    assert [row["name"] for row in found.layers] == ["h.0.mlp.fc.weight", "h.0.attn.qkv.weight"]
    first = found.layers[0]
    assert first["module"] == "mlp" and T - 12 <= first["departed_step"] <= T - 10 and first["lead_steps"] == T - first["departed_step"]
    assert found.layers[1]["lead_steps"] == 2
    assert {g["module"]: g["departed"] for g in found.groups} == {
        "embeddings": 0, "attention": 1, "mlp": 1, "norms": 0, "head": 0,
    }
    assert found.earliest_step == first["departed_step"]


def test_a_clean_window_implicates_no_tensor(steps):
    found = attribute_layers(healthy_layers(steps), onset=T, peak=T, reference=T)
    assert found.layers == [] and found.precursors == [] and found.earliest_step is None
    config = AnalysisConfig()
    assert found.history_steps == T - config.lookback  # every logged step before the lookback window


def test_a_blip_that_returned_to_normal_before_onset_is_not_the_departure(steps):
    layers = healthy_layers(steps)
    head = layers["name"] == "head.weight"
    layers.loc[head & (layers["step"] == T - 50), "grad_norm"] *= 20  # an isolated outlier long before
    layers.loc[head & layers["step"].between(T - 1, T), "grad_norm"] *= 20
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert [(r["name"], r["departed_step"]) for r in found.layers] == [("head.weight", T - 1)]


def test_a_nonfinite_gradient_is_the_most_extreme_departure(steps):
    layers = healthy_layers(steps)
    layers.loc[(layers["name"] == "embed.weight") & (layers["step"] == T), ["grad_norm", "nonfinite"]] = [math.inf, 12]
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert found.layers[0]["name"] == "embed.weight" and found.layers[0]["z"] == math.inf


_FULL_ONLY = ["param_norm", "grad_max", "update_norm", "update_ratio", "exp_avg_norm", "exp_avg_sq_mean", "exp_avg_sq_max", "eps_frac"]


def _light_steps(layers, every):
    """Blank the full statistics on all but every `every`-th step, as `watch(budget=...)` records them."""
    light = layers["step"] % every != 0
    layers.loc[light, _FULL_ONLY] = math.nan
    return layers


def test_steps_without_the_full_statistics_implicate_no_tensor(steps):
    found = attribute_layers(_light_steps(healthy_layers(steps), 25), onset=T - 1, peak=T - 1, reference=T - 1)
    assert found.layers == [] and found.precursors == [] and found.earliest_step is None


def test_a_parameter_gone_non_finite_is_named_past_the_light_steps_that_measure_no_parameter_norm(steps):
    layers = _light_steps(healthy_layers(steps), 25)  # steps T - 24 .. T - 1 have no parameter norms
    layers.loc[(layers["name"] == "head.weight") & (layers["step"] >= T), "param_norm"] = math.inf
    assert attribute_layers(layers, onset=T, peak=T, reference=T).nonfinite_params == (T, ["head.weight"])


def test_light_steps_alone_name_no_non_finite_parameter(steps):
    found = attribute_layers(_light_steps(healthy_layers(steps), 25), onset=T - 1, peak=T - 1, reference=T - 1)
    assert found.nonfinite_params is None


def test_a_gradient_departure_is_dated_on_steps_without_the_full_statistics(steps):
    layers = _light_steps(healthy_layers(steps), 25)
    layers.loc[(layers["name"] == "head.weight") & layers["step"].between(T - 1, T), "grad_norm"] *= 20
    found = attribute_layers(layers, onset=T - 1, peak=T, reference=T)
    assert [(r["name"], r["departed_step"]) for r in found.layers] == [("head.weight", T - 1)]


def test_a_metric_with_too_few_values_in_the_baseline_is_not_judged(steps):
    layers = _light_steps(healthy_layers(steps), 100)  # 3 update ratios before the lookback window
    head = layers["name"] == "head.weight"
    layers.loc[head & layers["update_ratio"].notna(), "update_ratio"] = 1e-3  # no spread: sigma at its floor
    layers.loc[head & (layers["step"] == T), "update_ratio"] = 3e-3
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert found.layers == []
    dense = healthy_layers(steps)
    dense.loc[(dense["name"] == "head.weight") & (dense["step"] == T), "update_ratio"] *= 3
    assert [r["name"] for r in attribute_layers(dense, onset=T, peak=T, reference=T).layers] == ["head.weight"]


def test_a_nan_update_ratio_on_a_step_that_measured_the_others_is_still_non_finite(steps):
    layers = _light_steps(healthy_layers(steps), 25)
    layers.loc[(layers["name"] == "embed.weight") & (layers["step"] == T), "update_ratio"] = math.nan
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert [(r["name"], r["update_z"]) for r in found.layers] == [("embed.weight", math.inf)]


def test_too_little_history_gives_no_scores_rather_than_guesses(steps):
    layers = healthy_layers(steps.iloc[:6])
    found = attribute_layers(layers, onset=5, peak=5, reference=5)
    assert found.layers == [] and found.history_steps < 8


# -------------------------------------------------------------------------- optimizer precursors


def test_a_rising_eps_fraction_before_onset_is_a_precursor(steps):
    layers = healthy_layers(steps)
    ramp = (layers["name"] == "h.0.attn.proj.weight") & layers["step"].between(T - 40, T)
    layers.loc[ramp, "eps_frac"] = np.linspace(0.01, 0.4, int(ramp.sum()))
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    eps = [p for p in found.precursors if p["kind"] == "eps_frac_rise"]
    assert [p["name"] for p in eps] == ["h.0.attn.proj.weight"]
    assert T - 40 < eps[0]["step"] < T - 20 and eps[0]["value"] == pytest.approx(0.4)
    assert found.earliest_step == eps[0]["step"]


def test_a_collapsing_second_moment_before_onset_is_a_precursor(steps):
    layers = healthy_layers(steps)
    fall = (layers["name"] == "head.weight") & layers["step"].between(T - 30, T)
    layers.loc[fall, "exp_avg_sq_mean"] *= np.geomspace(1.0, 1e-3, int(fall.sum()))
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    collapse = [p for p in found.precursors if p["kind"] == "exp_avg_sq_collapse"]
    assert [p["name"] for p in collapse] == ["head.weight"]
    assert "collapsed to" in collapse[0]["sentence"]


def test_a_second_moment_collapse_in_a_gap_of_the_state_statistics_is_dated_to_the_gap(steps):
    layers = _light_steps(healthy_layers(steps), 5)  # state statistics every 5 steps: T - 5 and T measured
    collapse = (layers["name"] == "head.weight") & (layers["step"] >= T - 2)
    layers.loc[collapse, "exp_avg_sq_mean"] *= 1e-3
    found = attribute_layers(layers, onset=T - 1, peak=T - 1, reference=T - 1)
    [p] = [p for p in found.precursors if p["kind"] == "exp_avg_sq_collapse"]
    assert (p["name"], p["step"]) == ("head.weight", T - 4)
    assert f"between steps {T - 4} and {T} (no state statistics in between)" in p["sentence"]


def test_state_statistics_after_a_measured_onset_are_not_searched(steps):
    layers = _light_steps(healthy_layers(steps), 5)
    layers.loc[(layers["name"] == "head.weight") & (layers["step"] >= T + 1), "exp_avg_sq_mean"] *= 1e-3
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert not [p for p in found.precursors if p["kind"] == "exp_avg_sq_collapse"]


def test_an_update_far_off_history_without_a_gradient_change_points_at_the_optimizer(steps):
    layers = healthy_layers(steps)
    layers.loc[(layers["name"] == "h.0.mlp.proj.weight") & (layers["step"] == T), "update_ratio"] *= 40
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert [p["kind"] for p in found.precursors] == ["update_without_grad"]
    assert found.layers[0]["update_z"] > 6 and found.layers[0]["grad_z"] < 3


def test_module_kinds_place_unnamed_projections_by_registration_order_in_their_block():
    # The spike suite's GPT names its attention output `proj` and its MLP output `out`.
    meta = json.loads((Path(__file__).parent.parent / "sample_runs" / "clean" / "meta.json").read_text())
    types = parameter_modules(meta)
    kinds = module_kinds(list(types), types)
    assert [kinds[f"blocks.1.{n}.weight"] for n in ("qkv", "proj", "fc", "out")] == ["attention", "attention", "mlp", "mlp"]
    assert kinds["wte.weight"] == "embeddings" and kinds["ln_f.weight"] == "norms"


def test_module_kinds_infer_nothing_without_the_registration_order():
    assert module_kinds(["blocks.0.qkv.weight", "blocks.0.proj.weight"], {})["blocks.0.proj.weight"] == "other"


def _five_sigmas_up(column: str) -> list[dict]:
    """One batch about 5 robust sigmas and 1.6x above 99 batches spread evenly over 0.6 +- 0.075
    (lengths: the same times 100)."""
    scale = 1.0 if column == "distinct_token_ratio" else 100.0
    values = [scale * (0.6 + 0.025 * ((i % 7) - 3)) for i in range(99)]
    run = pd.DataFrame({"step": range(100), column: values + [scale * 0.96]})
    profile = batch_profile(run)
    center, sigma = profile.stats[column]
    assert 4.5 <= (0.96 * scale - center) / sigma < 6  # the band in which the two thresholds differ
    return attribute_batches(run.tail(1), profile=profile)


def test_a_distinct_token_ratio_five_sigmas_and_half_again_above_the_run_is_an_anomaly():
    assert _five_sigmas_up("distinct_token_ratio")[0]["flags"] == ["high_distinct_token_ratio"]


def test_a_sequence_length_five_sigmas_above_the_run_is_not_yet_an_anomaly():
    assert _five_sigmas_up("seq_len_max")[0]["flags"] == []


def test_one_garbled_batch_among_normal_ones_is_no_high_entropy_stretch():
    from spikedoc.analysis.batches import BatchProfile, high_entropy_stretch

    profile = BatchProfile(stats={"distinct_token_ratio": (0.6, 0.05)})
    ratios = [0.6, 0.62, 1.0, 0.58, 0.61]  # one random-byte batch (z 8) inside an incident of five steps
    batches = [{"step": s, "stats": {"distinct_token_ratio": r}} for s, r in enumerate(ratios)]
    assert high_entropy_stretch(batches, profile, AnalysisConfig()) is None
    lifted = [{"step": s, "stats": {"distinct_token_ratio": r + 0.12}} for s, r in enumerate(ratios)]
    assert high_entropy_stretch(lifted, profile, AnalysisConfig()) is not None


@pytest.mark.parametrize("beta2, every", [(0.95, 1), (0.999, 1), (0.9, 1), (0.95, 20)])
def test_a_second_moment_decaying_by_its_own_updates_is_never_said_to_be_written_from_outside(beta2, every):
    from spikedoc.analysis.state_precursors import _fall_beyond_updates

    # The gradient vanished: each update multiplies the second moment by beta2 (the fastest it can shrink).
    steps = list(range(0, 200, every))
    column = pd.Series([beta2**s for s in steps], index=steps)
    assert all(_fall_beyond_updates(column, s) is None for s in steps[1:])


@pytest.mark.parametrize("ratio, gap", [(0.0, 1), (0.05, 1), (1e-4, 30)])
def test_a_second_moment_falling_further_than_its_updates_allow_is_said_to_be_written(ratio, gap):
    from spikedoc.analysis.state_precursors import _fall_beyond_updates

    column = pd.Series([1.0, 1.0, ratio], index=[0, 10, 10 + gap])
    fell = _fall_beyond_updates(column, 10 + gap)
    assert fell is not None and fell[1] == gap


def test_state_statistics_compared_across_a_gap_after_a_dense_warmup_are_no_sudden_collapse(steps):
    # A cost budget: full statistics on the first steps (dense while its costs are unknown), then none
    # until a flag densifies them again 80 steps before onset. The second moments were higher in
    # those first steps, as early in training they are; nothing moved suddenly.
    layers = healthy_layers(steps)
    layers = layers.loc[layers["step"] >= T - 160]  # the rows analyze reads: its lookback and history
    layers.loc[layers["step"] < T - 150, "exp_avg_sq_mean"] *= 20  # the dense first steps
    layers.loc[(layers["step"] >= T - 150) & (layers["step"] < T - 101), _FULL_ONLY] = math.nan
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    assert not [p for p in found.precursors if p["kind"] == "exp_avg_sq_collapse"]


def test_a_second_moment_written_down_inside_a_gap_of_the_statistics_is_found_as_written_from_outside(steps):
    # No state statistics from T - 95 to T - 81 (a cost budget's light steps): head.weight's second
    # moment written down 100x at T - 90, inside the gap. Over a gap the change is no sudden-change
    # score, but no update shrinks a second moment 100x in 16 steps.
    layers = healthy_layers(steps)
    layers.loc[(layers["step"] >= T - 95) & (layers["step"] < T - 80), _FULL_ONLY] = math.nan
    layers.loc[(layers["name"] == "head.weight") & (layers["step"] >= T - 90), "exp_avg_sq_mean"] *= 1e-2
    found = attribute_layers(layers, onset=T, peak=T, reference=T)
    collapses = [p for p in found.precursors if p["kind"] == "exp_avg_sq_collapse"]
    assert [(p["name"], p["overwritten"], p["step"]) for p in collapses] == [("head.weight", True, T - 95)]


@pytest.mark.parametrize(("seed", "resume_at", "bad_at"), [(3, 100, 112), (5, 120, 150)])
def test_positions_of_a_resumed_job_that_gave_no_start_sample_are_said_to_count_from_its_resume(tmp_path, seed,
                                                                                                resume_at, bad_at):
    resume_then_bad_batch(tmp_path, seed=seed, resume_at=resume_at, bad_at=bad_at, steps=bad_at + 40, start_sample=False)
    inc = next(i for i in spikedoc.analyze(tmp_path).incidents if i.onset_step == bad_at)
    skip = next(a for a in inc.recommendation["actions"] if a["action"] == "skip_data")
    # The monitor counted from 0 again at the resume: (bad_at - resume_at) batches of 8 in, not bad_at.
    assert skip["positions"] == [[8 * (bad_at - resume_at), 8 * (bad_at - resume_at + 1)]]
    assert skip["positions_from"] == resume_at
    assert f"counted from the resume at step {resume_at}" in action_text(skip)
    assert all(b["positions_from"] == resume_at for b in inc.batches)


def test_a_resume_recipe_for_an_incident_analyze_calls_recovered_keeps_the_stops_target_and_says_where_positions_count(
        tmp_path):
    # The online judgement stopped; analyze judged the bad batch recovered and names no rollback target.
    from spikedoc.integrations import StopDecision, resume_recipe

    resume_then_bad_batch(tmp_path, seed=5, resume_at=120, bad_at=150, steps=190, start_sample=False)
    inc = next(i for i in spikedoc.analyze(tmp_path).incidents if i.onset_step == 150)
    assert inc.recommendation["skip_sample_positions_from"] == 120
    decision = StopDecision(onset_step=150, step=160, verdict="persistent", excess_ratio=0.5, excess_sigma=9.0,
                            expected_loss=2.0)  # fmt: skip
    recipe = resume_recipe(tmp_path, decision)
    assert inc.recommendation["rollback_to_step"] is None and recipe.analysis_error is None
    assert recipe.rollback_to_step == 0 and recipe.checkpoint is None  # no checkpoint recorded before the onset
    assert recipe.skip_sample_positions_from == 120
    assert any("counted from the resume at step 120" in line for line in recipe.lines())


def test_positions_of_a_resumed_job_given_its_start_sample_are_stream_positions(tmp_path):
    resume_then_bad_batch(tmp_path, seed=3, resume_at=100, bad_at=112, steps=152, start_sample=True)
    inc = next(i for i in spikedoc.analyze(tmp_path).incidents if i.onset_step == 112)
    skip = next(a for a in inc.recommendation["actions"] if a["action"] == "skip_data")
    assert skip["positions"] == [[8 * 112, 8 * 113]] and skip["positions_from"] is None
    assert inc.recommendation["skip_sample_positions_from"] is None
    assert "counted from" not in action_text(skip)
