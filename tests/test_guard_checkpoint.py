"""Guard checkpoints: atomic, checked before use, and a killed run resumes exactly where it was."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import spikedoc
from spikedoc.guard import CheckpointError
from spikedoc.guard.checkpoint import CheckpointStore, host_copy
from tests.common.guarded import build, loader, nan_grads, run_guarded

ROOT = Path(__file__).resolve().parent.parent


def _script(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.common.guarded_script", str(run_dir), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _state(model, opt) -> dict:
    return {**host_copy({"model": model.state_dict(), "optimizer": opt.state_dict()}), "guard": {}, "data": {}, "rng": {}}


def test_a_checkpoint_with_nan_or_inf_is_refused_when_saved_and_when_loaded(tmp_path):
    model, opt, _ = build()
    store = CheckpointStore(tmp_path, keep=3)
    state = _state(model, opt)
    state["model"]["head.weight"][0, 0] = math.inf
    with pytest.raises(CheckpointError, match="NaN or inf"):
        store.save(10, state, healthy=True)
    assert store.checkpoints() == []
    # A file written by someone else holding a NaN is refused on load too.
    torch.save({"format": 1, "step": 10, "healthy": True, **state}, tmp_path / "step-00000010.pt")
    store.adopt()
    with pytest.raises(CheckpointError, match="NaN or inf"):
        store.load(store.checkpoints()[0])


def test_a_new_store_removes_the_temporaries_a_killed_write_of_its_rank_left(tmp_path):
    mine = [tmp_path / ".step-00000010.rank1.pt.tmp-4242", tmp_path / ".step-00000012.rank1.unhealthy.pt.tmp-99"]
    theirs = [tmp_path / ".step-00000010.rank0.pt.tmp-4243", tmp_path / "notes.tmp-1"]
    for path in [*mine, *theirs]:
        path.write_bytes(b"half a checkpoint")
    CheckpointStore(tmp_path, keep=2, rank=1)
    assert [p for p in mine if p.exists()] == [] and all(p.exists() for p in theirs)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "pickled_object"])
def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path, damage):
    model, opt, _ = build()
    store = CheckpointStore(tmp_path, keep=3, in_memory=False)
    checkpoint = store.save(10, _state(model, opt), healthy=True)
    if damage == "truncated":
        data = checkpoint.path.read_bytes()
        checkpoint.path.write_bytes(data[: len(data) // 3])
    elif damage == "foreign":
        torch.save({"model": model.state_dict()}, checkpoint.path)
    else:  # weights_only=True refuses arbitrary pickled objects
        torch.save({"format": 1, "step": 10, "evil": Path("/")}, checkpoint.path)
    with pytest.raises(CheckpointError):
        store.load(checkpoint)


def test_only_the_last_keep_good_checkpoints_stay_on_disk(tmp_path):
    model, opt, _ = build()
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(step, _state(model, opt), healthy=True)
    store.save(40, _state(model, opt), healthy=False)
    assert [(c.step, c.healthy) for c in store.checkpoints()] == [(20, True), (30, True), (40, False)]
    assert store.rollback_target(35).step == 30 and store.rollback_target(19) is None


class _HeldWrites(CheckpointStore):
    """A store whose background file writes wait until `release` is set (the write itself is real)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, background=True, **kwargs)
        self.release = threading.Event()

    def _save(self, path, payload) -> None:
        assert self.release.wait(30)
        super()._save(path, payload)


def test_a_background_write_returns_at_once_and_its_file_lands_later(tmp_path):
    model, opt, _ = build()
    store = _HeldWrites(tmp_path, keep=2)
    checkpoint = store.save(10, _state(model, opt), healthy=True)
    assert not checkpoint.path.exists() and store.writing and store.landed() == []  # still under way
    store.release.set()
    store.wait()
    assert store.landed() == [(checkpoint, None)] and not store.writing
    reader = CheckpointStore(tmp_path, keep=2)  # nothing in memory: the file itself
    reader.adopt()
    written = reader.load(checkpoint)["model"]
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())


def test_a_rollback_during_a_background_write_waits_for_it_and_then_drops_the_abandoned_file(tmp_path):
    model, opt, _ = build()
    store = _HeldWrites(tmp_path, keep=3)
    store.release.set()
    store.save(10, _state(model, opt), healthy=True)
    store.release.clear()
    store.save(20, _state(model, opt), healthy=True)  # its file is held back
    threading.Timer(0.2, store.release.set).start()
    store.forget_after(10)  # waits for the write of step 20, then deletes it
    assert [c.step for c in store.checkpoints()] == [10] and not store._path(20, True).exists()
    assert [(c.step, e) for c, e in store.landed()] == [(10, None), (20, None)]


@pytest.mark.parametrize("in_memory", [True, False], ids=["rollback_from_memory", "rollback_from_disk"])
def test_guarded_training_is_the_same_with_files_written_in_the_background_or_not(tmp_path, in_memory):
    def train(background: bool):
        torch.manual_seed(0)
        model, opt, sched = build()
        guard, seen = run_guarded(tmp_path / f"bg{background}", steps=40, parts=(model, opt, sched), checkpoint_every=10,
                                  keep_in_memory=in_memory, write_in_background=background,
                                  after_backward=nan_grads({25, 26, 27, 28, 29}))  # fmt: skip
        events = spikedoc.load(tmp_path / f"bg{background}").events
        actions = [{k: Path(v).name if k == "checkpoint" else v for k, v in a.items()} for a in guard.actions]  # own run dir
        return model.state_dict(), seen, actions, sorted(events.loc[events["kind"] == "checkpoint", "step"])

    background, foreground = train(True), train(False)
    assert all(torch.equal(background[0][k], foreground[0][k]) for k in foreground[0])
    assert background[1:3] == foreground[1:3] and any(a["kind"] == "rollback" for a in background[2])
    assert background[3] == foreground[3] and background[3]  # the same checkpoint events, each once


def test_a_failed_checkpoint_write_warns_records_and_training_goes_on(tmp_path):
    blocker = tmp_path / "run" / "checkpoints"
    blocker.parent.mkdir()
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.warns(RuntimeWarning, match="checkpoint of step"):
        guard, _ = run_guarded(tmp_path / "run", steps=30, checkpoint_every=10)
    assert guard.step == 30
    events = spikedoc.load(tmp_path / "run").events
    assert (events["kind"] == "checkpoint_failed").sum() >= 3


def test_a_crash_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    run_dir = tmp_path / "run"
    proc = _script(run_dir, "--steps", "45", "--die-in-save-of", "40")
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert any(p.name.startswith(".step-00000040") for p in (run_dir / "checkpoints").iterdir())  # the torn file
    model, opt, sched = build()
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=run_dir, checkpoint_every=20, resume=True)
    assert guard.step == 20  # the newest complete checkpoint
    guard.close()


def _killed_and_resumed(tmp_path: Path, after: int, *common: str) -> tuple[dict, dict]:
    """The final state of a run of `common` killed after its checkpoint of step `after` and resumed,
    and of the same run never killed."""
    reference = _script(tmp_path / "reference", *common)
    killed = _script(tmp_path / "killed", *common, "--sleep-from", str(after))
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / f"step-{after:08d}.pt").exists():
        assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {after} in time"
        time.sleep(0.05)
    time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert reference.wait(120) == 0, reference.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "final.pt").exists()

    resumed = _script(tmp_path / "killed", *common)
    assert resumed.wait(120) == 0, resumed.stderr.read().decode()[-2000:]
    assert "guard_resume" in set(spikedoc.load(tmp_path / "killed").events["kind"])
    return (torch.load(tmp_path / "reference" / "final.pt", weights_only=True),
            torch.load(tmp_path / "killed" / "final.pt", weights_only=True))  # fmt: skip


def test_a_run_killed_with_sigkill_resumes_with_all_its_state_and_ends_as_if_never_killed(tmp_path):
    want, got = _killed_and_resumed(tmp_path, 40, "--steps", "70", "--nan", "25-29")  # a rollback (to 20) before the kill
    # The rollback's LR cut and tighter clip survive the kill; no batch was skipped (the NaN gradients
    # were the loop's: the step 25 batches replayed in band on the checkpoint).
    assert (got["rollbacks"], got["lr_scale"], got["clip"], got["skipped"]) == (1, 0.7, 0.5, [])
    for name, tensor in want["params"].items():
        assert torch.equal(tensor, got["params"][name]), name


def test_a_run_killed_after_skipping_bad_data_resumes_still_skipping_it(tmp_path):
    # The garbage comes once the guard's band is warm (50 applied steps), the kill after it.
    want, got = _killed_and_resumed(tmp_path, 80, "--steps", "100", "--garbage", "62-66")
    assert got["skipped"] == want["skipped"] and len(got["skipped"]) == 5  # the reproduced garbage, skipped once
    assert (got["lr_scale"], got["rollbacks"]) == (want["lr_scale"], want["rollbacks"])
    for name, tensor in want["params"].items():
        assert torch.equal(tensor, got["params"][name]), name


def test_a_fresh_run_never_rolls_back_to_another_runs_checkpoints_in_its_directory(tmp_path):
    run_guarded(tmp_path, steps=60, checkpoint_every=20)  # leaves checkpoints of steps 20, 40, 60

    guard, _ = run_guarded(tmp_path, steps=55, checkpoint_every=25, resume=False,
                           after_backward=nan_grads(set(range(45, 50))))  # fmt: skip
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["to_step"] == 25  # its own, not the other run's checkpoint of step 40


def test_the_same_job_in_its_run_dir_resumes_automatically_and_says_so(tmp_path):
    run_guarded(tmp_path, steps=30, checkpoint_every=10)
    model, opt, sched = build()
    with pytest.warns(RuntimeWarning, match="resuming from .*step-00000030.* the same job"):
        guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path, checkpoint_every=10)
    assert guard.step == 30
    guard.close()


def test_another_experiment_in_the_same_run_dir_is_refused_naming_what_differs(tmp_path):
    run_guarded(tmp_path, steps=30, checkpoint_every=10)
    model, opt, sched = build(lr=1e-3)  # the first run's LR was 3e-3
    with pytest.raises(ValueError, match=r"another job \(lr of param group 0: 0.003 -> 0.001\).*resume=False"):
        spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path, checkpoint_every=10)
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path, checkpoint_every=10,
                           resume=False)  # fmt: skip
    assert guard.step == 0 and opt.param_groups[0]["initial_lr"] == 1e-3
    guard.close()


def test_resume_true_continues_another_jobs_checkpoints_and_names_the_difference(tmp_path):
    run_guarded(tmp_path, steps=30, checkpoint_every=10)
    model, opt, sched = build(lr=1e-3)
    with pytest.warns(RuntimeWarning, match="as asked, although the job differs: lr of param group 0"):
        guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path, resume=True)
    assert guard.step == 30
    guard.close()


def test_resume_from_a_path_continues_that_checkpoint_in_a_new_run_dir(tmp_path):
    run_guarded(tmp_path / "first", steps=30, checkpoint_every=10)
    model, opt, sched = build()
    path = tmp_path / "first" / "checkpoints" / "step-00000020.pt"
    with pytest.warns(RuntimeWarning, match="resuming from"):
        guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=tmp_path / "second", resume=path)
    assert next(guard)[0] == 20  # the loop begins: its own copy of that state, a rollback target in its run dir
    guard.close()
    assert (tmp_path / "second" / "checkpoints" / "step-00000020.pt").exists()
