"""SpikedocCallback(heal=...) in a real Lightning Trainer: bad steps vetoed, damage rolled back in process."""

from __future__ import annotations

import math

import pytest
import torch

from tests.common.frameworks import ByteText, require

L = require("lightning.pytorch", "lightning")

import spikedoc  # noqa: E402
from spikedoc.guard import GuardConfig, GuardStopped  # noqa: E402
from spikedoc.integrations.lightning import SpikedocCallback  # noqa: E402
from tests.common.lightning_lm import CharLM, fit  # noqa: E402

BATCH, STEPS, FAULT, LR, DECAY = 8, 150, 100, 3e-3, 10_000


class Settings(L.Callback):
    """What the Trainer itself uses at each batch: its clipping norm, its scheduler's LR, its step counter."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
        self.seen.append((trainer.global_step, trainer.gradient_clip_val, lr))


class InfWeight(L.Callback):
    """One weight of the first norm layer (every token passes it) is inf for the forward of step `at`
    only (restored before the update): NaN loss and gradients."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at and self.saved is None:
            w = _norm_weight(pl_module)
            self.saved = w.data.flatten()[0].clone()
            w.data.view(-1)[0] = math.inf

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = _norm_weight(pl_module)
        if self.saved is not None and not torch.isfinite(w.data.view(-1)[0]):
            w.data.view(-1)[0] = self.saved


def _norm_weight(module: torch.nn.Module) -> torch.Tensor:
    return next(p for p in module.parameters() if p.ndim == 1)


def train(tmp_path, data, *callbacks, heal=None, steps=STEPS):
    cb = SpikedocCallback(heal=heal if heal is not None else GuardConfig(checkpoint_every=20))
    torch.manual_seed(0)
    module = CharLM(lr=LR, decay_steps=DECAY)
    trainer = fit(tmp_path, module, data, [*callbacks, cb], batch_size=BATCH, max_steps=steps, gradient_clip_val=1.0)
    return trainer, cb, module


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A stretch of 30 steps of binary garbage from step FAULT, healed."""
    torch.set_num_threads(1)
    data = ByteText(33, corrupt_after=FAULT * BATCH, corrupt_until=(FAULT + 30) * BATCH, garbage=(128, 256))
    settings = Settings()
    trainer, cb, _ = train(tmp_path_factory.mktemp("corrupt"), data, settings)
    return trainer, cb, data, settings


def test_corrupt_stretch_is_vetoed_and_rolled_back_in_process(corrupt):
    trainer, cb, _, _ = corrupt
    vetoed = [a["step"] for a in cb.healer.actions if a["kind"] == "veto"]
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    assert vetoed[0] == FAULT and rollback["from_step"] == FAULT + 5
    assert rollback["to_step"] % 20 == 0 and rollback["to_step"] < FAULT
    assert trainer.global_step == STEPS


def test_rollback_applies_lr_factor_to_the_scheduler_and_clip_to_gradient_clip_val(corrupt):
    _, cb, _, settings = corrupt
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    last_vetoed = min(i for i, s in enumerate(settings.seen) if s[0] == FAULT + 4)
    step, clip, lr = settings.seen[last_vetoed + 1]
    assert step == rollback["to_step"]  # Lightning's own global_step went back to the checkpoint
    assert clip == rollback["clip"] == 0.5  # tightened from 1.0 in Trainer.gradient_clip_val
    assert lr == pytest.approx(LR * 0.7 * (1 - step / DECAY))  # the module's scheduler scaled by lr_factor


def test_the_loader_moves_on_past_the_fault(corrupt):
    _, cb, data, _ = corrupt
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    replayed = rollback["from_step"] - rollback["to_step"]
    # Every step trained or replayed read fresh batches (the loader may read ahead): none came back.
    assert BATCH * (STEPS + replayed) <= len(data.fetched_indices) <= BATCH * (STEPS + replayed + 2)
    assert len(set(data.fetched_indices)) == len(data.fetched_indices)


def test_vetoes_on_the_stretch_after_a_rollback_skip_it_and_undo_the_remedy(corrupt):
    _, cb, _, settings = corrupt
    skips = [a for a in cb.healer.actions if a["kind"] == "data_skip"]
    assert skips and skips[0]["remedy_reverted"]
    assert cb.healer.rollbacks == 1 and cb.healer.lr_scale == 1.0
    step, clip, lr = settings.seen[-1]
    assert clip == 1.0 and lr == pytest.approx(LR * (1 - step / DECAY))


def test_events_are_recorded_for_analyze(corrupt):
    _, cb, _, _ = corrupt
    run = spikedoc.load(cb.run.run_dir)
    assert {"veto", "rollback", "data_skip"} <= set(run.events["kind"])
    steps = run.steps.drop_duplicates("step", keep="last")
    assert steps["loss"].iloc[-10:].lt(4.0).all()  # trained on past the stretch, on text
    spikedoc.analyze(cb.run.run_dir)


def test_a_nan_step_alone_is_vetoed_and_nothing_rolled_back(tmp_path):
    trainer, cb, module = train(tmp_path, ByteText(33), InfWeight(FAULT), steps=FAULT + 20)
    vetoes = [a for a in cb.healer.actions if a["kind"] == "veto"]
    assert [v["step"] for v in vetoes] == [FAULT] and "nonfinite" in vetoes[0]["reasons"]
    assert cb.healer.rollbacks == 0 and trainer.global_step == FAULT + 20
    assert all(torch.isfinite(p).all() for p in module.parameters())
    state = trainer.optimizers[0].state_dict()["state"]
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))


def test_spent_rollback_budget_stops_with_guard_stopped(tmp_path):
    data = ByteText(33, corrupt_after=FAULT * BATCH, garbage=(128, 256))
    with pytest.raises(GuardStopped, match="rollback budget spent") as stopped:
        train(tmp_path, data, heal=GuardConfig(checkpoint_every=20, max_rollbacks=0))
    assert stopped.value.diagnosis["reason"] == "budget"
    assert "guard_stop" in set(spikedoc.load(tmp_path / "spikedoc").events["kind"])
