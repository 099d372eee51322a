"""SpikedocCallback in a real transformers Trainer: the same data as `watch`, and a stop on a persistent incident."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.common.frameworks import ByteText, require

transformers = require("transformers", "hf")
require("accelerate", "hf")

import spikedoc  # noqa: E402
from spikedoc.integrations.hf import SpikedocCallback  # noqa: E402

SEQ = 32


def tiny_model(kind: str) -> torch.nn.Module:
    """A tiny GPT2 or Llama built from a config in code (nothing downloaded)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def trainer(model, out, data, callbacks, **args) -> transformers.Trainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    disable_tqdm=True)  # fmt: skip
    settings.update(args)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data,
                                callbacks=callbacks)  # fmt: skip


class PostClipGrads(transformers.TrainerCallback):
    """Brute force: float64 per-tensor gradient norms right before each optimizer step (after the clip)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.named, self.norms = dict(model.named_parameters()), []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.norms.append({n: float(p.grad.double().norm()) for n, p in self.named.items() if p.grad is not None})


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_records_the_trainers_grad_norm_loss_and_clipping_with_accumulation(tmp_path, kind):
    model = tiny_model(kind)
    brute = PostClipGrads(model)
    cb = SpikedocCallback(stop=False)
    t = trainer(model, tmp_path, ByteText(SEQ), [cb, brute], max_steps=8, gradient_accumulation_steps=2,
                max_grad_norm=0.5, lr_scheduler_type="linear")  # fmt: skip
    t.train()
    steps = spikedoc.load(tmp_path / "spikedoc").steps
    logs = [entry for entry in t.state.log_history if "grad_norm" in entry]
    assert list(steps["step"]) == list(range(8)) and len(logs) == 8
    # The Trainer logs what clip_grad_norm_ returned: the norm before its clipping.
    assert steps["grad_norm"].to_numpy() == pytest.approx([e["grad_norm"] for e in logs], rel=1e-5)
    # Its logged loss is rounded to 4 decimals; its train_loss (the mean over steps) is not.
    assert steps["loss"].to_numpy() == pytest.approx([e["loss"] for e in logs], abs=6e-5)
    assert steps["loss"].mean() == pytest.approx(t.state.log_history[-1]["train_loss"], rel=1e-5)
    assert (steps["micro_batches"] == 2).all()
    assert (steps["clip_max_norm"] == 0.5).all()
    coef = (0.5 / (steps["grad_norm"] + 1e-6)).clip(upper=1.0)
    assert steps["clip_coef"].to_numpy() == pytest.approx(coef.to_numpy(), rel=1e-5)
    assert steps["lr"].to_numpy() == pytest.approx([1e-3 * (1 - s / 8) for s in range(8)], rel=1e-5)
    layers = spikedoc.load(tmp_path / "spikedoc").layers()
    for step, post in enumerate(brute.norms):  # pre-clip norms times the coefficient = post-clip norms
        rows = layers[layers["step"] == step].set_index("name")["grad_norm"] * steps["clip_coef"][step]
        assert rows.to_dict() == pytest.approx(post, rel=1e-4)


def test_checkpoints_are_recorded_at_the_step_they_resume(tmp_path):
    cb = SpikedocCallback(stop=False)
    t = trainer(tiny_model("gpt2"), tmp_path, ByteText(SEQ), [cb], max_steps=6, save_strategy="steps", save_steps=3)
    t.train()
    events = spikedoc.load(tmp_path / "spikedoc").events
    saved = events[events["kind"] == "checkpoint"]
    assert list(saved["step"]) == [3, 6]
    assert all((tmp_path / f"checkpoint-{s}").is_dir() for s in saved["step"])


def test_a_persistent_incident_stops_training_with_the_diagnosis_and_a_resume_recipe(tmp_path, caplog):
    bad_from_step = 80
    data = ByteText(SEQ, corrupt_after=bad_from_step * 4)  # a data shard that goes bad and stays bad
    cb = SpikedocCallback()
    t = trainer(tiny_model("gpt2"), tmp_path, data, [cb], max_steps=400, learning_rate=3e-3, lr_scheduler_type="constant",
                max_grad_norm=1.0, save_strategy="steps", save_steps=25)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="spikedoc.integrations"):
        t.train()
    recipe = cb.recipe
    assert recipe is not None and recipe.verdict in ("persistent", "divergence")
    assert bad_from_step <= recipe.onset_step <= bad_from_step + 2
    # Stopped once the verdict was decided (patience_steps after onset at the latest), not at max_steps.
    assert t.state.global_step <= recipe.onset_step + 52
    assert recipe.checkpoint == str(tmp_path / "checkpoint-75") and recipe.rollback_to_step == 75
    assert recipe.analysis_error is None
    assert recipe.peak_lr == pytest.approx(3e-3, rel=1e-6) and recipe.clip_max_norm is not None
    # The same judgement offline: analyze finds the incident unrecovered and recommends this rollback.
    diagnosis = spikedoc.analyze(tmp_path / "spikedoc")
    incident = min(diagnosis.incidents, key=lambda i: abs(i.onset_step - recipe.onset_step))
    assert incident.verdict != "recovered" and incident.recommendation["rollback"]
    assert incident.cause == recipe.cause
    stop_logs = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    assert len(stop_logs) == 1 and "peak LR" in stop_logs[0]
    assert f'resume_from_checkpoint="{tmp_path / "checkpoint-75"}"' in stop_logs[0]
    assert math.isfinite(recipe.peak_lr)
