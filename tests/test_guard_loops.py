"""The guard in the loops people write: any data source replayed exactly, a hand-set LR scaled and held."""

from __future__ import annotations

import warnings

import pytest
import torch

import spikedoc
from tests.common.models import char_text, make_model

STEPS, ROLLBACK_AT, EVERY = 30, 24, 10


def get_batch(split: str = "train", batch_size: int = 8, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's sampler: random offsets drawn from the global RNG (the split picks the text's half)."""
    ids = char_text().ids
    ids = ids[: len(ids) // 2] if split == "train" else ids[len(ids) // 2 :]
    ix = torch.randint(len(ids) - block - 1, (batch_size,))
    return torch.stack([ids[i : i + block] for i in ix]), torch.stack([ids[i + 1 : i + 1 + block] for i in ix])


class RandomWindows:
    """A re-iterable drawing each batch from the global RNG when it is asked for."""

    def __iter__(self):
        for _ in range(1000):
            yield get_batch()


class ShuffledAtIter:
    """A re-iterable whose order is drawn from the global RNG when it is iterated (a shuffling iterable dataset)."""

    def __init__(self) -> None:
        torch.manual_seed(3)
        self.batches = [get_batch() for _ in range(200)]

    def __iter__(self):
        return (self.batches[i] for i in torch.randperm(len(self.batches)).tolist())


def _generator():
    while True:
        yield get_batch()


def _stateful():
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    windows = [get_batch(batch_size=1) for _ in range(2000)]
    pairs = [(x[0], y[0]) for x, y in windows]
    return stateful.StatefulDataLoader(pairs, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))


def _parts():
    torch.manual_seed(0)
    model = make_model(0)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def _train_iterating(tmp_path, data, *, accumulate: int = 2):
    """The guard hands out the batches: `for step, batch in guard`; the losses of every pass of every step."""
    model, opt = _parts()
    guard = spikedoc.Guard(model, opt, data=data, run_dir=tmp_path, checkpoint_every=EVERY, max_steps=STEPS,
                           accumulate=accumulate)  # fmt: skip
    losses: dict[int, list[list[torch.Tensor]]] = {}
    micro: list[torch.Tensor] = []
    for step, batch in guard:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        if step % 5 == 0 and not micro:  # an evaluation draws from the global RNG between the training batches
            with torch.no_grad():
                model(get_batch("val")[0])
        loss = model(x, labels=y).loss
        micro.append(loss.detach().clone())
        (loss / accumulate).backward()
        if len(micro) < accumulate:
            continue
        if step == ROLLBACK_AT and not guard.rollbacks:
            guard.request_rollback()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault(step, []).append(micro)
        micro = []
    guard.close()
    return guard, losses


def _train_drawing(tmp_path, *, accumulate: int = 2, get_lr=None, rollback_at: int = ROLLBACK_AT, steps: int = STEPS,
                   after_backward=None, data=get_batch, every: int = EVERY, **options):
    """nanoGPT's shape: the loop draws (prefetching the next batch), evaluates on its own draws, sets the LR by hand."""
    model, opt = _parts()
    guard = spikedoc.Guard(model, opt, data=data, run_dir=tmp_path, checkpoint_every=every, max_steps=steps, **options)
    draw = guard.draw
    losses: dict[int, list[list[torch.Tensor]]] = {}
    applied: dict[int, list[float]] = {}
    X, Y = draw("train")
    for it in guard.steps():
        if isinstance(data, CorruptAt):
            data.at_step(it)
        if get_lr is not None:
            for group in opt.param_groups:
                group["lr"] = get_lr(it)
        if it % 5 == 0:  # an evaluation draws from the same RNG, without gradients
            with torch.no_grad():
                model(*draw("val")[:1])
        micro = []
        for _ in range(accumulate):
            loss = model(X, labels=Y).loss
            micro.append(loss.detach().clone())
            X, Y = draw("train")  # the next micro-step's batch, drawn before this one's backward
            (loss / accumulate).backward()
        if it == rollback_at and not guard.rollbacks:
            guard.request_rollback()
        if after_backward is not None:
            after_backward(it, guard)
        opt.step()
        applied.setdefault(it, []).append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        losses.setdefault(it, []).append(micro)
    return guard, losses, applied


class CorruptAt:
    """`get_batch` whose training draws at data positions `corrupt` are random tokens (the same on
    every pass). It counts its draws, and the loop rewinds the count with its step counter after a
    rollback, as a file read at an offset would be: the same positions are corrupt on every pass."""

    def __init__(self, corrupt: range) -> None:
        self.corrupt, self.drawn, self._at_step = corrupt, 0, {}

    def at_step(self, it: int) -> None:
        if self._at_step and it <= max(self._at_step):  # a rollback: back to where that step began
            self.drawn = self._at_step[it]
            self._at_step = {s: at for s, at in self._at_step.items() if s <= it}
        self._at_step[it] = self.drawn

    def __call__(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = get_batch(split)
        if split == "train" and torch.is_grad_enabled():
            if self.drawn in self.corrupt:
                gen = torch.Generator().manual_seed(self.drawn)
                r = torch.randint(0, char_text().vocab_size, (x.shape[0], x.shape[1] + 1), generator=gen)
                x, y = r[:, :-1], r[:, 1:]
            self.drawn += 1
        return x, y


def _replayed_step(guard, losses) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    first, replay = losses[rollback["to_step"]]
    return first, replay


@pytest.mark.parametrize("source", ["generator", "reiterable_drawing_from_the_rng", "reiterable_shuffled_when_iterated",
                                    "stateful_dataloader"])  # fmt: skip
def test_the_loss_at_a_replayed_step_equals_the_original_bit_for_bit(tmp_path, source):
    data = {"generator": _generator, "reiterable_drawing_from_the_rng": RandomWindows,
            "reiterable_shuffled_when_iterated": ShuffledAtIter, "stateful_dataloader": _stateful}[source]()  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a generator's replay is said to be exact only if it draws from the RNG
        guard, losses = _train_iterating(tmp_path, data)
    first, replay = _replayed_step(guard, losses)
    assert guard.rollbacks == 1 and len(first) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, replay, strict=True))


def test_a_prefetching_loop_drawing_from_a_function_replays_the_same_batches_bit_for_bit(tmp_path):
    guard, losses, _ = _train_drawing(tmp_path)
    first, replay = _replayed_step(guard, losses)
    assert guard.rollbacks == 1 and guard.step == STEPS
    assert all(torch.equal(a, b) for a, b in zip(first, replay, strict=True))
    assert sorted(losses) == list(range(STEPS))  # the loop's step counter followed the rollback


def test_a_prefetching_loop_resumed_in_a_new_guard_trains_on_the_batch_its_checkpoint_held(tmp_path):
    _, first, _ = _train_drawing(tmp_path / "first", rollback_at=-1)
    _train_drawing(tmp_path / "resumed", rollback_at=-1, steps=25)  # stops after step 24; checkpoint of step 20
    with pytest.warns(RuntimeWarning, match="resuming from .*step-00000020"):
        _, resumed, _ = _train_drawing(tmp_path / "resumed", rollback_at=-1)
    assert min(resumed) == 20
    assert all(torch.equal(a, b) for a, b in zip(first[20][0], resumed[20][0], strict=True))


def _blamed_batches_on_a_broken_state(tmp_path):
    """Positions 200-209 (steps 100-104, the band warm) corrupt, and NaN gradients at steps 100-105
    on the first pass: the last healthy batches replayed at step 105 find the vetoed state broken,
    and the step 100 batches replayed on the checkpoint reproduce their loss there, so the rollback
    skips the stretch's batches."""
    from tests.common.guarded import nan_grads

    return _train_drawing(tmp_path, rollback_at=-1, steps=160, every=20, data=CorruptAt(range(200, 210)),
                          after_backward=nan_grads(set(range(100, 106))))  # fmt: skip


def test_skipping_a_blamed_batch_of_a_function_draws_fresh_batches_and_the_rollback_says_so(tmp_path):
    guard, losses, _ = _blamed_batches_on_a_broken_state(tmp_path)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["evidence"]["cause_test"]["replays"][-1]["found"] == "data"
    assert rollback["to_step"] == 80 and rollback["skipped_by"] == "fresh_draws"
    assert rollback["skipped_positions"] == list(range(200, 210))  # steps 100-104, two micro-batches each
    assert guard.step == 160 and sorted(losses) == list(range(160))


def test_fresh_draws_in_place_of_skipped_batches_are_not_said_to_replay_inexactly(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, _, _ = _blamed_batches_on_a_broken_state(tmp_path)
    assert guard.rollbacks == 1 and not any("does not replay exactly" in str(w.message) for w in caught)


def test_a_one_shot_iterator_over_fixed_batches_says_once_that_its_replay_is_not_exact(tmp_path):
    batches = iter([get_batch() for _ in range(200)])
    with pytest.warns(RuntimeWarning, match="one-shot iterator") as caught:
        guard, _ = _train_iterating(tmp_path, batches)
    assert guard.rollbacks == 1 and sum("one-shot" in str(w.message) for w in caught) == 1


def test_a_hand_set_lr_is_scaled_by_the_rollbacks_factor_and_the_loops_value_is_left_as_set(tmp_path):
    def get_lr(it: int) -> float:
        return 3e-3 * min(1.0, (it + 1) / 10)

    guard, _, applied = _train_drawing(tmp_path, get_lr=get_lr)
    back = next(a for a in guard.actions if a["kind"] == "rollback")["to_step"]
    assert guard.lr_scale == pytest.approx(0.7)
    steps = spikedoc.load(tmp_path).steps
    replay = steps.loc[steps["segment"] == steps["segment"].max()].set_index("step")["lr"]
    assert list(replay.index) == list(range(back, STEPS))
    assert replay.to_numpy() == pytest.approx([0.7 * get_lr(s) for s in range(back, STEPS)], rel=1e-6)  # as applied
    assert applied[STEPS - 1][-1] == get_lr(STEPS - 1)  # the loop's own value after the step


def test_a_hand_set_lr_jump_is_held_at_its_level_before_the_jump(tmp_path):
    def get_lr(it: int) -> float:
        return 1e-3 if it < 20 else 1e-2  # a jump the loop's own LR code makes

    guard, _, _ = _train_drawing(tmp_path, get_lr=get_lr, rollback_at=25)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["cause"] == "lr_schedule" and rollback["to_step"] == 20
    steps = spikedoc.load(tmp_path).steps
    replay = steps.loc[steps["segment"] == steps["segment"].max()].set_index("step")["lr"]
    assert replay.to_numpy() == pytest.approx([1e-3] * (STEPS - 20), rel=1e-6)


def test_the_nanogpt_shaped_loop_is_guarded_by_four_changed_lines_and_heals_its_planted_nan_steps(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "hooks" / "guarded_nanogpt.py"
    changed = [line for line in script.read_text().splitlines() if line.rstrip().endswith("# spikedoc")]
    assert len(changed) == 4  # the import, the Guard, get_batch = guard.draw, the loop's `for`
    done = subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path), "--max-iters", "45",
                           "--eval-interval", "20", "--checkpoint-every", "20", "--nan-at", "25"],
                          cwd=script.parent.parent, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 vetoed, 1 rollbacks" in done.stdout
    evals = re.findall(r"step 20: (.*)", done.stdout)
    assert len(evals) == 2 and evals[0] == evals[1]  # the evaluation at the step returned to, replayed exactly
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 40  # the loop's own checkpoint


def _hf_stream():
    """A Hugging Face `datasets` stream of (x, y) windows, read in batches: its own state_dict says where it is."""
    datasets = pytest.importorskip("datasets")
    windows = [get_batch(batch_size=1) for _ in range(600)]
    table = {"x": [x[0].tolist() for x, _ in windows], "y": [y[0].tolist() for _, y in windows]}
    return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=4)


def _batched(stream):
    return stream.batch(batch_size=8).with_format("torch")


def test_a_hugging_face_datasets_stream_replays_the_same_batches_bit_for_bit(tmp_path):
    guard, losses = _train_iterating(tmp_path, _batched(_hf_stream()))
    first, replay = _replayed_step(guard, losses)
    assert guard.rollbacks == 1 and len(first) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, replay, strict=True))


def test_a_hugging_face_stream_with_a_shuffle_buffer_is_said_to_replay_inexactly(tmp_path):
    stream = _hf_stream().shuffle(seed=5, buffer_size=64)  # the buffer is refilled, not restored, on resume
    with pytest.warns(RuntimeWarning, match="does not replay exactly"):
        guard, _ = _train_iterating(tmp_path, _batched(stream))
    assert guard.rollbacks == 1


def _zero_second_moments_at(step: int):
    """An `after_backward`: Adam's `exp_avg_sq` zeroed before the update every time `step` is reached."""

    def after_backward(it: int, guard) -> None:
        if it == step:
            for state in guard.optimizer.state.values():
                state["exp_avg_sq"].zero_()

    return after_backward


def test_a_clean_prefetching_loop_drawing_from_a_function_has_no_veto_and_no_rollback(tmp_path):
    guard, losses, _ = _train_drawing(tmp_path, rollback_at=-1, steps=100, every=20)
    assert guard.vetoes == 0 and guard.rollbacks == 0 and sorted(losses) == list(range(100))


def test_a_corrupt_stretch_in_a_prefetching_loop_is_skipped_after_a_probe_finds_the_state_sound(tmp_path):
    from spikedoc.analysis.guard_actions import cause_status

    corrupt = range(240, 270)  # steps 120-134, two micro-batches each
    guard, _, _ = _train_drawing(tmp_path, rollback_at=-1, steps=160, every=20, data=CorruptAt(corrupt))
    skips = [a for a in guard.actions if a["kind"] == "data_skip"]
    assert guard.step == 160 and guard.rollbacks == 0 and skips  # the probe found the state sound: no rollback
    assert all([r["replay"] for r in s["cause_test"]["replays"]] == ["other_batches", "same_batches"] for s in skips)
    assert all(s["cause_test"]["found"] == "data" for s in skips)
    assert all(cause_status("data_skip", s)["status"] == "confirmed" for s in skips)
    vetoed = {pos for a in guard.actions if a["kind"] == "veto" for pos in a["positions"]}
    assert vetoed and vetoed <= set(corrupt) <= set(guard.skipped_positions)  # never a clean batch blamed, every corrupt one skipped


def test_replay_steps_in_a_prefetching_loop_are_never_applied_and_the_batch_the_loop_held_comes_next(tmp_path):
    guard, _, _ = _train_drawing(tmp_path, rollback_at=-1, steps=160, every=20, data=CorruptAt(range(240, 270)))
    skip = next(a for a in guard.actions if a["kind"] == "data_skip")
    replayed = [r["probe_step"] for r in skip["cause_test"]["replays"]]
    steps = spikedoc.load(tmp_path).steps
    last = steps.loc[steps["segment"] == steps["segment"].max()].set_index("step")
    assert all(bool(last.loc[step, "skipped"]) for step in replayed)
    after = next(a for a in guard.actions if a["kind"] in ("veto", "rollback") and a.get("step", -1) > max(replayed))
    assert after["step"] == max(replayed) + 1 and after["positions"][0] == max(skip["positions"]) + 1


def test_a_second_moment_collapse_that_returns_in_a_prefetching_loop_stops_as_recurring_blaming_the_state(tmp_path):
    # One rollback to the checkpoint before step 130; its replay meets the collapse again there.
    with pytest.raises(spikedoc.GuardStopped, match="second moments collapsed again at step 130 .* the loop overwrites "
                       "the optimizer state") as stopped:  # fmt: skip
        _train_drawing(tmp_path, rollback_at=-1, steps=160, every=20, after_backward=_zero_second_moments_at(130))
    diagnosis = stopped.value.diagnosis
    [rollback] = diagnosis["actions"]
    assert diagnosis["reason"] == "recurring" and diagnosis["decision"]["cause"] == "optimizer_state"
    assert rollback["cause"] == "optimizer_state" and rollback["to_step"] == 120 and not rollback["skipped_positions"]


@pytest.mark.parametrize(("loop_clip", "tightened"), [(2.0, 1.0), (5.0, 1.0)])
def test_a_rollback_tightens_the_loops_own_clip_when_the_guard_is_given_none(tmp_path, loop_clip, tightened):
    # nanoGPT clips with its own `clip_grad_norm_` and is guarded with `clip=None`: the rollback's
    # tighter clip starts from the loop's norm, not from "no clip" (which would add the loop's own).
    guard = _nan_steps_under_a_loop_clip(tmp_path, loop_clip)
    [rollback] = [a for a in guard.actions if a["kind"] == "rollback"]
    assert (rollback["clip_before"], rollback["clip"], rollback["clip_of_loop"]) == (loop_clip, tightened, True)
    assert guard.clip == tightened


def test_a_loop_clip_the_rollback_keeps_is_not_applied_a_second_time_by_the_guard(tmp_path):
    # A clip that acts on most steps is kept (tightening it would cut every update): the guard then
    # leaves clipping to the loop rather than clipping again at the same norm on every step.
    guard = _nan_steps_under_a_loop_clip(tmp_path, 0.8)
    [rollback] = [a for a in guard.actions if a["kind"] == "rollback"]
    assert rollback["clip_kept"] and rollback["clip"] == 0.8 and guard.clip is None


def _nan_steps_under_a_loop_clip(tmp_path, loop_clip: float):
    """A loop clipping itself at `loop_clip`, guarded with `clip=None`, NaN gradients at steps 25-29 (first pass)."""
    model, opt = _parts()
    guard = spikedoc.Guard(model, opt, data=get_batch, run_dir=tmp_path, checkpoint_every=20, max_steps=45, clip=None)
    for it in guard.steps():
        x, y = guard.draw("train")
        model(x, labels=y).loss.backward()
        if 25 <= it < 30 and not guard.rollbacks:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    guard.close()
    return guard


class ShorterFrom(CorruptAt):
    """`CorruptAt` whose training draws from data position `shorter` on are 24 tokens long, not 32: a
    replay of the earlier batches does not fit the batch the loop holds."""

    def __init__(self, corrupt: range, shorter: int) -> None:
        super().__init__(corrupt)
        self.shorter = shorter

    def __call__(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        short = split == "train" and torch.is_grad_enabled() and self.drawn >= self.shorter
        x, y = super().__call__(split)
        return (x[:, :24].contiguous(), y[:, :24].contiguous()) if short else (x, y)


def test_a_replay_the_loop_cannot_take_rolls_back_untested_and_the_steps_go_on_from_the_step_rolled_back_to(tmp_path):
    data = ShorterFrom(range(240, 270), shorter=240)  # steps 120-134 corrupt and shorter from then on
    with pytest.warns(RuntimeWarning, match="another shape"):
        guard, losses, _ = _train_drawing(tmp_path, rollback_at=-1, steps=160, every=20, data=data)
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["to_step"] < rollback["from_step"] and "cause_test" not in rollback["evidence"]
    assert guard.step == 160 and set(losses) == set(range(160))  # every step index once more from the one rolled back to


def test_a_checkpoint_due_during_replay_steps_is_taken_at_the_first_healthy_step_after_them(tmp_path):
    # Steps 135-139 corrupt: five vetoes, then the replay steps from 140, where a checkpoint is due.
    guard, _, _ = _train_drawing(tmp_path, rollback_at=-1, steps=170, every=20, data=CorruptAt(range(270, 280)))
    replayed = [a["step"] for a in guard.actions if a["kind"] == "replay"]
    assert replayed and min(replayed) <= 140 <= max(replayed)
    events = spikedoc.load(tmp_path).events
    checkpoints = sorted(int(s) for s, k in zip(events["step"], events["kind"]) if k == "checkpoint")
    assert any(max(replayed) < s <= max(replayed) + 2 for s in checkpoints), checkpoints
