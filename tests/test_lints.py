"""Specification of the configuration lints: each fires on its pattern, with numbers, and is silent otherwise."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from spikedoc.analysis import analyze
from spikedoc.analysis.lints import LINTS, lint
from tests.common.planted import adamw_meta, healthy_steps, write_run


@pytest.fixture
def meta():
    return adamw_meta()


@pytest.fixture
def steps():
    return healthy_steps()


def _ids(meta, steps):
    return [f.id for f in lint(meta, steps)]


def test_a_standard_adamw_setup_has_no_finding(meta, steps):
    assert _ids(meta, steps) == []


def test_lints_say_nothing_without_meta_or_steps():
    assert lint({}, None) == [] and lint(None) == []


def test_adam_with_weight_decay_is_coupled_l2(meta, steps):
    meta["optimizer"]["class"] = "torch.optim.adam.Adam"
    finding = lint(meta, steps)[0]
    assert finding.id == "adam_coupled_weight_decay" and finding.severity == "warning"
    assert "weight_decay=0.1 in 1 param group:" in finding.message and "AdamW" in finding.message
    assert "Loshchilov" in finding.why


def test_adam_without_weight_decay_is_fine(meta, steps):
    meta["optimizer"]["class"] = "Adam"
    meta["optimizer"]["groups"][0]["weight_decay"] = 0.0
    assert "adam_coupled_weight_decay" not in _ids(meta, steps)


def test_weight_decay_on_biases_and_norm_weights(meta, steps):
    groups = meta["optimizer"]["groups"]
    groups[0]["params"] += groups[1]["params"]
    groups[1]["params"] = []
    finding = next(f for f in lint(meta, steps) if f.id == "decay_on_bias_and_norm")
    assert finding.details["tensors"] == ["h.0.ln_1.weight", "h.0.mlp.proj.bias"]
    assert finding.message.startswith("weight decay 0.1 applies to 2 bias/norm tensors")


def test_beta2_0999_in_a_from_scratch_run(meta, steps):
    for group in meta["optimizer"]["groups"]:
        group["betas"] = [0.9, 0.999]
    finding = next(f for f in lint(meta, steps) if f.id == "beta2_high_for_pretraining")
    assert "beta2 = 0.999 in a run trained from scratch" in finding.message and "0.95" in finding.message


def test_beta2_0999_is_fine_for_a_fine_tuning_run_whose_loss_barely_moves(meta):
    for group in meta["optimizer"]["groups"]:
        group["betas"] = [0.9, 0.999]
    steps = healthy_steps(loss0=2.2, floor=2.0)
    assert "beta2_high_for_pretraining" not in _ids(meta, steps)


def test_no_warmup_visible_in_the_lr_series(meta):
    finding = next(f for f in lint(meta, healthy_steps(warmup=0)) if f.id == "no_warmup")
    assert finding.message.startswith("no warmup: the LR at step 0 was already 0.001 (1x its peak 0.001)")


def test_no_warmup_is_not_judged_on_a_log_that_starts_mid_run(meta):
    assert "no_warmup" not in _ids(meta, healthy_steps(warmup=0, start=8000))


def test_no_clipping_when_clip_is_unset_and_no_step_was_clipped(meta, steps):
    meta["watch"]["clip"] = None
    finding = next(f for f in lint(meta, steps) if f.id == "no_clipping")
    assert finding.message.startswith("no gradient clipping: neither watch(clip=) nor a clip_grad_norm_ in the loop clipped, "
                                      "and clip_coef stayed 1.0; grad norm median 0.")
    assert finding.details["grad_norm_median"] == pytest.approx(float(np.median(steps["grad_norm"])))


def test_no_clipping_is_silent_when_the_loop_clips_itself(meta, steps):
    # The loop's clip_grad_norm_ at 5.0 never bit (grad norms ~0.5), but clipping is in use.
    meta["watch"]["clip"] = None
    steps["clip_max_norm"] = 5.0
    assert "no_clipping" not in _ids(meta, steps)


def test_clipping_always_active_names_the_loops_own_max_norm(meta, steps):
    meta["watch"]["clip"] = None
    steps["clip_max_norm"] = 0.25
    steps["clip_coef"] = 0.25 / steps["grad_norm"]
    finding = next(f for f in lint(meta, steps) if f.id == "clipping_always_active")
    assert "max norm 0.25 is below the typical gradient norm" in finding.message


def test_clipping_on_nearly_every_step_is_reported(meta, steps):
    steps["clip_coef"] = 0.3
    finding = next(f for f in lint(meta, steps) if f.id == "clipping_always_active")
    assert finding.message.startswith("clipping was active on 100% of steps (median coefficient 0.3): max norm 1")


def test_accumulation_whose_loss_is_summed_scales_the_grad_norm_with_micro_batches(meta, steps):
    k = np.where(steps["step"] % 2 == 0, 1, 4)
    steps["micro_batches"] = k
    steps["grad_norm"] *= k  # summed: the accumulated gradient is K times one micro-batch's
    finding = next(f for f in lint(meta, steps) if f.id == "accumulation_not_averaged")
    assert finding.details["slope"] == pytest.approx(1.0, abs=0.05)
    assert "not divided by the number of micro-batches" in finding.message


def test_accumulation_with_an_averaged_loss_is_fine(meta, steps):
    k = np.where(steps["step"] % 2 == 0, 1, 4)
    steps["micro_batches"] = k
    steps["grad_norm"] /= np.sqrt(k) ** 0.5  # averaging shrinks the noise part a little
    assert "accumulation_not_averaged" not in _ids(meta, steps)


def test_the_nested_meta_layout_is_read_too(steps):
    meta = {
        "model": {"parameters": [{"name": "ln.weight", "module_type": "LayerNorm"}, {"name": "fc.weight", "module_type": "Linear"}]},
        "optimizer": {"class": "Adam", "param_groups": [{"index": 0, "weight_decay": 0.01, "betas": [0.9, 0.95],
                                                         "params": ["ln.weight", "fc.weight"]}]},
        "config": {"clip": None},
    }
    assert _ids(meta, steps) == ["adam_coupled_weight_decay", "decay_on_bias_and_norm", "no_clipping"]


def test_every_lint_id_is_documented():
    text = (Path(__file__).resolve().parent.parent / "docs" / "analysis.md").read_text()
    assert [i for i in LINTS if f"`{i}`" not in text] == []


def test_lints_reach_the_diagnosis_of_a_recorded_run(tmp_path, steps):
    meta = copy.deepcopy(adamw_meta())
    meta["optimizer"]["class"] = "Adam"
    meta["watch"]["clip"] = None
    diagnosis = analyze(write_run(tmp_path / "run", steps, meta=meta))
    assert [f.id for f in diagnosis.findings] == ["adam_coupled_weight_decay", "no_clipping"]
    assert diagnosis.to_dict()["findings"][0]["why"].startswith("Adam adds weight_decay")


def test_adam_lints_read_each_group_s_own_optimizer_when_several_step_the_model():
    # Muon first (meta's "class"), then torch Adam with an L2 penalty: the Adam groups are still linted.
    meta = {"optimizer": {"class": "torch.optim._muon.Muon", "groups": [
        {"optimizer_class": "torch.optim._muon.Muon", "weight_decay": 0.1, "params": ["blocks.0.w"]},
        {"optimizer_class": "torch.optim.adam.Adam", "weight_decay": 0.01, "betas": [0.9, 0.999], "params": ["head.w"]},
    ]}}
    found = {f.id: f for f in lint(meta)}
    assert found["adam_coupled_weight_decay"].details["groups"] == [1]
