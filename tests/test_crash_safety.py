"""A killed or badly placed run never costs the training: kill -9 keeps every completed part."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import spikedoc
from tests.common.models import make_model, train

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "hooks" / "plain_torch.py"


def _completed_parts(run_dir: Path, table: str) -> list[Path]:
    return sorted((run_dir / table / "rank=0").glob("part-*.parquet"))


def test_sigkill_mid_run_leaves_every_completed_part_readable(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--steps", "100000",
         "--flush-every", "5", "--sleep", "0.01"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_completed_parts(run_dir, "steps")) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no parts were flushed in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    steps_parts = _completed_parts(run_dir, "steps")
    layer_parts = _completed_parts(run_dir, "layers")
    run = spikedoc.load(run_dir)
    assert len(run.steps) == sum(pq.read_metadata(p).num_rows for p in steps_parts) >= 15
    assert len(run.layers()) == sum(pq.read_metadata(p).num_rows for p in layer_parts) > 0
    # Whole steps, in order, from the first: nothing in the middle is lost.
    assert run.steps["step"].tolist() == list(range(len(run.steps)))
    assert run.steps["loss"].notna().all() and (run.steps["grad_norm"] > 0).all()


def test_rows_are_written_at_interpreter_exit_without_close(tmp_path):
    code = (
        "import torch, spikedoc\n"
        "model = torch.nn.Linear(4, 1)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        f"monitor = spikedoc.watch(model, opt, run_dir={str(tmp_path)!r})\n"
        "for _ in range(7):\n"
        "    model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()\n"
    )  # no monitor.close(): the last step is still pending when the interpreter exits
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    run = spikedoc.load(tmp_path)
    assert run.steps["step"].tolist() == list(range(7))
    assert "close" in set(run.events["kind"])


def _unwritable(tmp_path: Path) -> Path:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return blocker / "run"  # a path under a regular file can never be created


def test_training_finishes_when_the_run_dir_cannot_be_created(tmp_path, caplog):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected = make_model()
    expected_opt = torch.optim.AdamW(expected.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="spikedoc"):
        monitor = spikedoc.watch(model, opt, run_dir=_unwritable(tmp_path), flush_every=2)
        losses = train(model, opt, 5)
        monitor.close()
    assert losses == train(expected, expected_opt, 5)  # training itself is unaffected
    assert monitor.step == 5
    assert monitor.dropped_rows >= 5  # every step row (and the layer rows) counted as lost
    assert any("a_file" in r.getMessage() for r in caplog.records)


def test_script_exits_normally_with_an_unwritable_run_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--run-dir", str(_unwritable(tmp_path)), "--steps", "6", "--flush-every", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recorded 6 steps" in result.stdout
    assert "could not write" in result.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_training_finishes_in_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with spikedoc.watch(model, opt, run_dir=locked / "run", flush_every=2) as monitor:
            train(model, opt, 4)
        assert monitor.step == 4 and monitor.dropped_rows > 0
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill driver forks its training processes (POSIX only)")
def test_kills_at_random_moments_and_inside_writes_leave_only_whole_files(tmp_path):
    from tests.common.killed import FLUSH_EVERY

    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "tests.common.killed", str(run_dir), "24", "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    kills = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(kills) == 24
    for kill in kills:
        assert kill["torn"] == [], kill  # every file with a final name is whole
        # What is on disk is the segment's first steps, in order: nothing in the middle is lost, and
        # at most the unflushed buffer at the end (the batch being filled, one the writer thread was
        # writing, and the row the monitor hands over a step late).
        assert kill["steps"] == list(range(kill["first_step"], kill["first_step"] + len(kill["steps"]))), kill
        assert kill["finished_steps"] - len(kill["steps"]) <= 2 * FLUSH_EVERY + 1, kill
        assert sum(kill["left_at_start"].values()) == 0, kill  # the last kill's temporaries: removed on start
    inside = {moment: sum(k["left_by_kill"][what] > 0 for k in kills if k["moment"] == moment)
              for moment, what in (("part_write", "parts"), ("checkpoint_write", "checkpoints"))}
    assert inside["part_write"] > 0 and inside["checkpoint_write"] > 0, inside  # the kills did land inside writes
    assert any(sum(k["left_before_start"].values()) for k in kills)  # so there were leftovers to clean
    run = spikedoc.load(run_dir)
    assert run.holes == [] and not [w for w in run.warnings if "unreadable" in w]
