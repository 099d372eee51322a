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

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from spikedoc.cli import app
from tests.common.cli import one_error_line

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
        one_error_line(result)


# A writer that keeps every row in its buffer (no part lands before close) and pauses after step 199.
PAUSING_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from spikedoc.store import RunWriter
    from tests.common.planted import adamw_meta, healthy_steps

    steps = healthy_steps(400)
    steps.loc[300, "loss"] *= 3
    writer = RunWriter(sys.argv[1], flush_every=1000, flush_seconds=3600.0)
    writer.open(adamw_meta())
    for row in steps.to_dict("records"):
        if row["step"] == 200:
            Path(sys.argv[2]).touch()
            time.sleep(float(sys.argv[3]))
        writer.add_step(row)
        time.sleep(0.002)
    writer.close()
""")


def _lines_until(process: subprocess.Popen, done, *, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while not (lines and done(lines[-1])):
        lines.append(_first_line(process, timeout=max(deadline - time.monotonic(), 0.01)))
    return lines


def test_the_rows_of_the_last_interval_are_shown_before_any_part_lands(tmp_path):
    run, paused = tmp_path / "live", tmp_path / "paused"
    run.mkdir()
    tail = _spikedoc("tail", str(run), "--interval", "0.2")
    _first_line(tail, timeout=120)  # waiting for ...
    writer = subprocess.Popen([sys.executable, "-c", PAUSING_WRITER, str(run), str(paused), "4"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.05)
        # The writer holds steps 0..199 in its buffer, no part written: the live file shows them.
        seen = _lines_until(tail, lambda line: line.startswith("step 199 "), timeout=3.0)
        assert not list((run / "steps").rglob("part-*.parquet")) and writer.poll() is None
        assert writer.wait(timeout=120) == 0
        time.sleep(1.0)
    finally:
        tail.send_signal(signal.SIGINT)
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    lines = [*seen, *out.splitlines()]
    assert [line for line in lines if line.startswith("step ")][-1].startswith("step 399 ")
    assert [line for line in lines if line.startswith("ALERT")] == [line for line in lines if line.startswith("ALERT step 300: loss")][:1]
    assert "stopped after 400 steps" in out, out  # the rows the live file showed are not counted again
    assert not (run / "live" / "steps-rank=0.parquet").exists()  # the writer removed it at close


def _run_with_parts(tmp_path: Path, *parts: pa.Table) -> Path:
    from tests.common.planted import adamw_meta, healthy_steps, write_run

    run = write_run(tmp_path / "run", healthy_steps(200), meta=adamw_meta())
    for seq, table in enumerate(parts, start=1):
        pq.write_table(table, run / "steps" / "rank=0" / f"part-0-{seq:06d}.parquet")
    return run


def test_an_empty_steps_part_is_read_as_no_rows(tmp_path):
    empty = pa.table({"step": pa.array([], pa.int64()), "loss": pa.array([], pa.float32())})
    result = runner.invoke(app, ["tail", str(_run_with_parts(tmp_path, empty)), "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("step 199  loss ")


def test_a_run_whose_only_part_is_empty_has_no_steps_yet(tmp_path):
    run = tmp_path / "run"
    (run / "steps" / "rank=0").mkdir(parents=True)
    (run / "meta.json").write_text('{"format_version": 1}')
    pq.write_table(pa.table({"step": pa.array([], pa.int64())}), run / "steps" / "rank=0" / "part-0-000000.parquet")
    line = one_error_line(runner.invoke(app, ["tail", str(run), "--once"]))
    assert "has no step rows yet" in line


def test_a_steps_part_without_a_step_column_is_one_error_line_as_in_analyze(tmp_path):
    run = _run_with_parts(tmp_path, pa.table({"loss": pa.array([2.0, 1.9], pa.float32())}))
    tail = one_error_line(runner.invoke(app, ["tail", str(run), "--once"]))
    analyze = one_error_line(runner.invoke(app, ["analyze", str(run)]))
    assert tail == analyze and "lacks the required column 'step'" in tail


def test_a_step_column_of_strings_is_read_as_numbers(tmp_path):
    as_text = pa.table({"step": pa.array([str(s) for s in range(200, 210)]), "loss": pa.array([2.0] * 10, pa.float32())})
    result = runner.invoke(app, ["tail", str(_run_with_parts(tmp_path, as_text)), "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("step 209  loss 2 ")


def test_a_meta_json_that_analyze_rejects_is_rejected_by_tail_alike(tmp_path):
    run = _run_with_parts(tmp_path)
    (run / "meta.json").write_text('{"format_version": "one"}')
    tail = one_error_line(runner.invoke(app, ["tail", str(run), "--once"]))
    analyze = one_error_line(runner.invoke(app, ["analyze", str(run)]))
    assert tail == analyze and "no valid format_version" in tail


def test_the_guard_actions_are_shown(tmp_path):
    from tests.common.planted import healthy_steps, write_run

    events = [("checkpoint", 100, {"guard": True, "path": "c/100.pt"}),
              ("veto", 150, {"reasons": ["loss_out_of_band"]}),
              ("rollback", 100, {"from_step": 160, "reason": "damage", "cause": "lr_schedule", "lr_scale": 0.7,
                                 "clip_before": 1.0, "clip": 0.5, "skipped_positions": [150]})]
    run = write_run(tmp_path / "run", healthy_steps(200), events=events)
    result = runner.invoke(app, ["tail", str(run), "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    guard = [line for line in result.output.splitlines() if line.startswith("GUARD")]
    # Worded as the report words them.
    assert guard == ["GUARD veto of step 150: loss_out_of_band",
                     "GUARD rollback from step 160 to 100 (damage, cause lr_schedule): LR x0.7 of the original, "
                     "clip 1 -> 0.5, 1 batches skipped"]
