"""Specification of `spikedoc tail RUN`: follows a run another process is writing, alerts, exits cleanly."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from typer.testing import CliRunner

from spikedoc.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_runs"
runner = CliRunner()

# A training process stand-in: writes 400 steps through the real RunWriter, a part every 25 steps,
# with one bad step (loss x3) at step 300.
WRITER = textwrap.dedent("""
    import sys, time
    from spikedoc.store import RunWriter
    from tests.common.planted import adamw_meta, healthy_steps

    steps = healthy_steps(400)
    steps.loc[300, "loss"] *= 3
    writer = RunWriter(sys.argv[1], flush_every=25, flush_seconds=3600.0)
    writer.open(adamw_meta())
    for row in steps.to_dict("records"):
        writer.add_step(row)
        time.sleep(0.008)
    writer.close()
""")


def _spikedoc(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    # A shell runs background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # give the child the default disposition a terminal's Ctrl-C meets.
    return subprocess.Popen([sys.executable, "-c", "from spikedoc.cli import app; app()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _first_line(process: subprocess.Popen, *, timeout: float) -> str:
    # Byte by byte from the pipe itself: communicate() later reads the pipe, not a file object's buffer.
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no output within {timeout} s"
        byte = os.read(process.stdout.fileno(), 1)
        assert byte, "the process ended before printing a line"
        line += byte
    return line.decode().rstrip("\n")


def test_tail_follows_a_run_being_written_and_alerts_on_the_bad_step(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    tail = _spikedoc("tail", str(run), "--interval", "0.1")
    first = _first_line(tail, timeout=120)  # Ctrl-C must reach the loop, not the interpreter's start-up
    assert first.startswith("waiting for "), first
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert writer.wait(timeout=120) == 0
        time.sleep(1.0)  # a few more intervals: the last part is read
    finally:
        tail.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    lines = [first, *out.splitlines()]
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) >= 3, out  # it saw the run grow, part after part
    assert progress[-1].startswith("step 399  loss ") and "grad norm" in progress[-1] and "lr " in progress[-1]
    alerts = [line for line in lines if line.startswith("ALERT")]
    assert alerts and alerts[0].startswith("ALERT step 300: loss"), out
    assert "stopped after 400 steps" in out and "Traceback" not in err


def test_once_reads_what_is_there_and_exits_0():
    result = runner.invoke(app, ["tail", str(SAMPLES / "lr_surge"), "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("step 299  loss 2.97  grad norm 9.9  lr ")
    assert "ALERT step 152: grad_norm" in result.output and "ALERT step 153: loss" in result.output


def test_missing_foreign_and_empty_runs_are_one_line_exit_2(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for run in ("nope", "foreign", "empty"):
        result = runner.invoke(app, ["tail", str(tmp_path / run), "--once"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
