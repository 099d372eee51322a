"""SpikedocCallback in a real Lightning Trainer: the same data as `watch`, and a stop on a persistent incident."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.common.frameworks import ByteText, require

L = require("lightning.pytorch", "lightning")

import spikedoc  # noqa: E402
from tests.common.lightning_lm import CharLM, fit  # noqa: E402
from spikedoc.integrations.lightning import SpikedocCallback  # noqa: E402


class PreClipNorm(L.Callback):
    """Brute force: the float64 total gradient norm right before Lightning clips (after the closure's backward)."""

    def __init__(self) -> None:
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double().flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.cat(grads).norm()))


def test_records_the_pre_clip_grad_norm_loss_and_lr_with_accumulation(tmp_path):
    module, brute = CharLM(decay_steps=8), PreClipNorm()
    fit(tmp_path, module, ByteText(33), [SpikedocCallback(stop=False), brute], max_steps=8, accumulate_grad_batches=2,
        gradient_clip_val=0.5)  # fmt: skip
    steps = spikedoc.load(tmp_path / "spikedoc").steps
    assert list(steps["step"]) == list(range(8))
    assert steps["grad_norm"].to_numpy() == pytest.approx(brute.norms, rel=1e-5)
    # The loss training_step returned, averaged over the two accumulated batches of each step.
    means = [sum(module.losses[2 * s : 2 * s + 2]) / 2 for s in range(8)]
    assert steps["loss"].to_numpy() == pytest.approx(means, rel=1e-6)
    assert (steps["micro_batches"] == 2).all() and (steps["samples"] == 8).all()
    assert (steps["clip_max_norm"] == 0.5).all()
    coef = (0.5 / (steps["grad_norm"] + 1e-6)).clip(upper=1.0)
    assert steps["clip_coef"].to_numpy() == pytest.approx(coef.to_numpy(), rel=1e-5)
    assert steps["lr"].to_numpy() == pytest.approx([1e-3 * (1 - s / 8) for s in range(8)], rel=1e-5)
    assert steps["update_norm"].gt(0).all() and steps["batch_hash"].nunique() == 8


def test_training_is_unchanged_by_the_callback(tmp_path):
    weights = []
    for name, callbacks in (("plain", []), ("watched", [SpikedocCallback(stop=False)])):
        module = CharLM()
        fit(tmp_path / name, module, ByteText(33), callbacks, max_steps=4, gradient_clip_val=1.0)
        weights.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_a_persistent_incident_stops_training_with_a_resume_recipe(tmp_path, caplog):
    from lightning.pytorch.callbacks import ModelCheckpoint

    bad_from_step = 80
    cb = SpikedocCallback()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=25, save_top_k=-1)
    with caplog.at_level(logging.WARNING, logger="spikedoc.integrations"):
        trainer = fit(tmp_path, CharLM(lr=3e-3), ByteText(33, corrupt_after=bad_from_step * 4), [cb, saver],
                      max_steps=400, gradient_clip_val=1.0, enable_checkpointing=True)  # fmt: skip
    recipe = cb.recipe
    assert recipe is not None and recipe.verdict in ("persistent", "divergence")
    assert bad_from_step <= recipe.onset_step <= bad_from_step + 2
    assert trainer.global_step <= recipe.onset_step + 53
    assert recipe.rollback_to_step == 75 and recipe.checkpoint.endswith("step=75.ckpt")
    diagnosis = spikedoc.analyze(tmp_path / "spikedoc")
    incident = min(diagnosis.incidents, key=lambda i: abs(i.onset_step - recipe.onset_step))
    assert incident.verdict != "recovered" and incident.cause == recipe.cause
    stop_logs = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    assert len(stop_logs) == 1 and f'ckpt_path="{recipe.checkpoint}"' in stop_logs[0]
