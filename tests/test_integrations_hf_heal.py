"""SpikedocCallback(heal=...) in a real transformers Trainer: bad steps vetoed, damage rolled back in process."""

from __future__ import annotations

import math

import pytest
import torch

from tests.common.frameworks import ByteText, require

transformers = require("transformers", "hf")
require("accelerate", "hf")

import spikedoc  # noqa: E402
from spikedoc.guard import GuardConfig, GuardStopped  # noqa: E402
from spikedoc.integrations.hf import SpikedocCallback  # noqa: E402

SEQ, BATCH, STEPS, FAULT = 32, 8, 150, 100
LR = 3e-3


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


class Settings(transformers.TrainerCallback):
    """What the Trainer itself uses at each step: its clipping norm, its scheduler's LR, its step counter."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.seen.append((state.global_step, args.max_grad_norm, lr_scheduler.get_last_lr()[0]))


class InfWeight(transformers.TrainerCallback):
    """One weight is inf for the forward of step `at` only (restored before the update): NaN loss and gradients."""

    def __init__(self, at: int) -> None:
        self.at, self.saved = at, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at and self.saved is None:
            w = model.transformer.wte.weight
            self.saved = w.data[0, 0].clone()
            w.data[0, 0] = math.inf

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at and self.saved is not None and not torch.isfinite(model.transformer.wte.weight[0, 0]):
            model.transformer.wte.weight.data[0, 0] = self.saved


def train(tmp_path, data, *callbacks, heal=None, steps=STEPS, **args):
    model = tiny_gpt2()
    cb = SpikedocCallback(heal=heal if heal is not None else GuardConfig(checkpoint_every=20))
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, learning_rate=LR, max_steps=steps,
                    lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=50, save_strategy="no", report_to=[],
                    use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)  # fmt: skip
    settings.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data,
                                   callbacks=[*callbacks, cb])  # fmt: skip
    return trainer, cb


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A stretch of 30 steps of binary garbage from step FAULT, healed."""
    torch.set_num_threads(1)
    data = ByteText(SEQ, corrupt_after=FAULT * BATCH, corrupt_until=(FAULT + 30) * BATCH, garbage=(128, 256))
    settings = Settings()
    trainer, cb = train(tmp_path_factory.mktemp("corrupt"), data, settings)
    trainer.train()
    return trainer, cb, data, settings


def test_corrupt_stretch_is_vetoed_and_rolled_back_in_process(corrupt):
    trainer, cb, _, _ = corrupt
    vetoed = [a["step"] for a in cb.healer.actions if a["kind"] == "veto"]
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    assert vetoed[0] == FAULT and rollback["from_step"] == FAULT + 5  # max_vetoes_in_row vetoes, then back
    assert rollback["to_step"] % 20 == 0 and rollback["to_step"] < FAULT
    assert trainer.state.global_step == STEPS  # the counter was set back and the run trained to max_steps


def test_rollback_applies_lr_factor_to_the_scheduler_and_clip_to_max_grad_norm(corrupt):
    _, cb, _, settings = corrupt
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    after = [s for s in settings.seen[settings.seen.index(next(s for s in settings.seen if s[0] == FAULT + 4)) + 1 :]]
    step, clip, lr = after[0]
    assert step == rollback["to_step"]  # the Trainer's own counter went back to the checkpoint
    assert clip == rollback["clip"] == 0.5  # tightened from 1.0 in args.max_grad_norm
    assert lr == pytest.approx(LR * 0.7)  # the Trainer's scheduler scaled by lr_factor


def test_the_loader_moves_on_past_the_fault(corrupt):
    trainer, cb, data, _ = corrupt
    rollback = next(a for a in cb.healer.actions if a["kind"] == "rollback")
    replayed = rollback["from_step"] - rollback["to_step"]
    # Every step trained or replayed read fresh batches (accelerate's loader reads one batch ahead):
    # none of the faulty ones came back.
    assert BATCH * (STEPS + replayed) <= len(data.fetched_indices) <= BATCH * (STEPS + replayed + 1)
    assert len(set(data.fetched_indices)) == len(data.fetched_indices)


def test_vetoes_on_the_stretch_after_a_rollback_skip_it_and_undo_the_remedy(corrupt):
    _, cb, _, settings = corrupt
    skips = [a for a in cb.healer.actions if a["kind"] == "data_skip"]
    assert skips and skips[0]["remedy_reverted"]
    assert cb.healer.rollbacks == 1 and cb.healer.lr_scale == 1.0
    assert settings.seen[-1][1:] == (1.0, pytest.approx(LR))  # the Trainer's own settings back


def test_events_are_recorded_for_analyze(corrupt):
    _, cb, _, _ = corrupt
    run = spikedoc.load(cb.run.run_dir)
    kinds = list(run.events["kind"])
    assert {"veto", "rollback", "data_skip"} <= set(kinds)
    steps = run.steps.drop_duplicates("step", keep="last")
    assert steps["loss"].iloc[-10:].lt(4.0).all()  # trained on past the stretch, on text
    spikedoc.analyze(cb.run.run_dir)  # reads the guard's events without error


def test_a_nan_step_alone_is_vetoed_and_nothing_rolled_back(tmp_path):
    trainer, cb = train(tmp_path, ByteText(SEQ), InfWeight(FAULT), steps=FAULT + 20)
    trainer.train()
    vetoes = [a for a in cb.healer.actions if a["kind"] == "veto"]
    # The clean steps before and after it: no veto, no rollback, periodic checkpoints.
    assert [v["step"] for v in vetoes] == [FAULT] and "nonfinite" in vetoes[0]["reasons"]
    assert cb.healer.rollbacks == 0 and trainer.state.global_step == FAULT + 20
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if isinstance(t, torch.Tensor))
    events = spikedoc.load(tmp_path / "spikedoc").events
    assert set(events["kind"]) - {"start", "close", "checkpoint"} == {"veto"}
    assert list(events[events["kind"] == "checkpoint"]["step"]) == [0, 20, 40, 60, 80, 100, 120]


def test_spent_rollback_budget_stops_with_guard_stopped(tmp_path):
    data = ByteText(SEQ, corrupt_after=FAULT * BATCH, garbage=(128, 256))
    trainer, cb = train(tmp_path, data, heal=GuardConfig(checkpoint_every=20, max_rollbacks=0))
    with pytest.raises(GuardStopped, match="rollback budget spent") as stopped:
        trainer.train()
    assert stopped.value.diagnosis["reason"] == "budget"
    events = spikedoc.load(tmp_path / "spikedoc").events
    assert "guard_stop" in set(events["kind"])


def test_heal_and_stop_exclude_each_other():
    with pytest.raises(ValueError, match="heal= or stop="):
        SpikedocCallback(heal=True, stop=True)
