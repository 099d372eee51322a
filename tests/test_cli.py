"""Specification of `spikedoc analyze RUN [--json]`: report, JSON, exit codes, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spikedoc.cli import app
from tests.common.planted import healthy_layers, healthy_steps, write_run
from tests.common.cli import one_error_line

T = 400
SAMPLE_RUNS = Path(__file__).resolve().parent.parent / "sample_runs"
runner = CliRunner()


def _analyze(*args: str):
    return runner.invoke(app, ["analyze", *map(str, args)])


@pytest.fixture
def clean(tmp_path) -> Path:
    steps = healthy_steps()
    return write_run(tmp_path / "clean", steps, healthy_layers(steps))


@pytest.fixture
def spiky(tmp_path) -> Path:
    steps = healthy_steps()
    steps.loc[T, "distinct_token_ratio"] = 0.02
    steps.loc[T:, "loss"] *= 1.6  # does not come back: a rollback is recommended
    return write_run(tmp_path / "spiky", steps, healthy_layers(steps), events=[("checkpoint", 350, {"path": "c/350.pt"})])


def test_help_lists_the_analyze_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "analyze" in result.output


def test_a_healthy_run_exits_0(clean):
    result = _analyze(clean)
    assert result.exit_code == 0, result.output
    assert "No incidents" in result.output


def test_a_run_with_incidents_exits_1_with_a_table_and_explanations(spiky):
    result = _analyze(spiky)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "Incidents" in text and "bad_batch" in text
    assert "distinct-token ratio 0.02: near-constant input" in text
    assert "roll back to c/350.pt (the state before step 350)" in text


def test_json_prints_the_diagnosis_dict(spiky):
    result = _analyze(spiky, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["format"] == 2 and data["incidents"][0]["cause"] == "bad_batch"
    assert data["incidents"][0]["recommendation"]["rollback_to_step"] == 350


def test_json_of_a_healthy_run_exits_0(clean):
    result = _analyze(clean, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["healthy"] is True


def test_lints_and_missing_inputs_are_reported(tmp_path):
    path = tmp_path / "log.csv"
    steps = healthy_steps(warmup=0)
    steps[["step", "loss", "lr"]].to_csv(path, index=False)
    result = _analyze(path)
    text = " ".join(result.output.split())
    assert "no_warmup" in text and "why:" in text
    assert "Not in this run" in text and "layers: no per-tensor attribution" in text


# ------------------------------------------------------------------------------------ as a newcomer meets it


def test_version_prints_the_package_version():
    import spikedoc

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"spikedoc {spikedoc.__version__}"


def test_bare_spikedoc_shows_the_help_and_exits_0():
    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    for command in ("analyze", "report", "tensorboard", "tail", "demo"):
        assert command in result.output


def test_help_links_to_the_docs_online_not_to_files_a_pip_user_lacks():
    text = "".join(runner.invoke(app, ["analyze", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "https://github.com/spikedoc/spikedoc/blob/main/docs/analysis.md" in text
    assert "(documentedindocs/analysis.md)" not in text


def test_quiet_prints_one_summary_line_and_keeps_the_exit_code(spiky, clean):
    result = _analyze(spiky, "--quiet")
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.endswith("(600 steps): 1 incident (1 severe), needs attention")
    result = _analyze(clean, "-q")
    assert result.exit_code == 0 and result.output.strip().endswith("healthy, no incidents")


def test_start_and_stop_analyse_a_half_open_step_range(spiky):
    before = _analyze(spiky, "--quiet", "--stop", T)  # steps 0..399: the incident at 400 is outside
    assert before.exit_code == 0 and "(400 steps): healthy" in before.output
    data = json.loads(_analyze(spiky, "--json", "--start", 100, "--stop", T + 1).stdout)
    assert (data["summary"]["first_step"], data["summary"]["last_step"]) == (100, T)
    assert [i["onset_step"] for i in data["incidents"]] == [T]


def test_threshold_and_window_reach_the_detector(spiky):
    strict = json.loads(_analyze(spiky, "--json", "--threshold", "1000").stdout)
    assert strict["incidents"] == []
    short = _analyze(spiky, "--quiet", "--window", "20")
    assert short.exit_code == 1, short.output


def test_bad_ranges_and_detector_settings_are_one_line_and_exit_2(spiky):
    assert "must be greater than --start" in one_error_line(_analyze(spiky, "--start", 10, "--stop", 10))
    assert "has no steps in [5000, )" in one_error_line(_analyze(spiky, "--start", 5000))
    assert "--threshold must be" in one_error_line(_analyze(spiky, "--threshold", "-1"))
    assert "--window must be" in one_error_line(_analyze(spiky, "--window", "1"))


# ------------------------------------------------------------------------------------ bad input


def test_a_missing_path_is_one_line_and_exit_2(tmp_path):
    assert "no such file or directory" in one_error_line(_analyze(tmp_path / "nope"))


def test_an_empty_directory_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "is an empty directory" in one_error_line(_analyze(tmp_path / "empty"))


def test_a_foreign_directory_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    assert "is not a run" in one_error_line(_analyze(tmp_path / "photos"))


def test_a_corrupt_parquet_file_is_one_line_and_exit_2(clean):
    for part in (clean / "steps").rglob("*.parquet"):
        part.write_bytes(b"PAR1 this is not parquet")
    assert "none of its" in one_error_line(_analyze(clean))


def test_a_truncated_part_among_good_ones_is_skipped_named_and_exits_3_incomplete(tmp_path):
    steps = healthy_steps()
    run = write_run(tmp_path / "run", steps.iloc[:300])
    write_run(run, steps.iloc[300:])
    part = sorted((run / "steps").rglob("*.parquet"))[-1]
    part.write_bytes(part.read_bytes()[:100])
    result = _analyze(run)
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "Incomplete run: 1 hole" in text and "step rows of every step missing (rank 0, segment 1)" in text
    assert "warning: skipped unreadable part" in text


def test_a_layer_part_cut_short_is_named_among_the_warnings_of_the_report_and_the_json(tmp_path):
    run = tmp_path / "bad_batch_long"
    shutil.copytree(SAMPLE_RUNS / "bad_batch_long", run)
    part = run / "layers" / "rank=0" / "part-0-000001.parquet"  # steps 100-199: the planted batch is at 170
    part.write_bytes(part.read_bytes()[:-1000])
    report = _analyze(run)
    assert report.exit_code == 1, report.output
    assert f"warning:skippedunreadablepart{part}:" in "".join(report.output.split())  # rich wraps long paths
    data = json.loads(_analyze(run, "--json").stdout)
    (warning,) = [w for w in data["warnings"] if str(part) in w]
    assert "per-tensor attribution lacks the rows it held" in warning
    assert data["incidents"] and data["incidents"][0]["layers"] == []  # the attribution it lost


def test_a_step_that_is_not_a_whole_number_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n0,3.0\n1.5,2.9\n2,2.8\n")
    assert "data row 2: step 1.5 is not a whole number" in one_error_line(_analyze(path))


def test_a_tensorboard_dir_of_two_runs_is_one_line_naming_them_and_exit_2(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name in ("lr_3e-4", "lr_1e-3"):
        with SummaryWriter(log_dir=str(tmp_path / "tb" / name)) as writer:
            for step in range(60):
                writer.add_scalar("train/loss", 3.0 - 0.01 * step, global_step=step)
    line = one_error_line(_analyze(tmp_path / "tb"))
    assert "holds 2 TensorBoard runs that log a loss (lr_1e-3, lr_3e-4)" in line
    assert f"spikedoc analyze {tmp_path / 'tb' / 'lr_3e-4'}" in line


def test_a_run_from_a_newer_format_version_is_one_line_and_exit_2(clean):
    meta = json.loads((clean / "meta.json").read_text())
    meta["format_version"] = 99
    (clean / "meta.json").write_text(json.dumps(meta))
    assert "upgrade spikedoc" in one_error_line(_analyze(clean))


def test_a_run_with_neither_a_finite_loss_nor_grad_norm_is_one_line_and_exit_2(tmp_path):
    steps = healthy_steps(n=60)
    steps["loss"] = np.nan
    steps["grad_norm"] = np.nan
    assert "neither a loss nor a grad norm with a finite value" in one_error_line(_analyze(write_run(tmp_path / "run", steps)))


def test_a_run_without_a_loss_is_analysed_on_its_grad_norm_not_refused(tmp_path):
    steps = healthy_steps()
    steps["loss"] = np.nan
    steps.loc[T, "grad_norm"] *= 40  # one batch's outlier gradient, back the next step
    result = _analyze(write_run(tmp_path / "run", steps, healthy_layers(steps)))
    output = " ".join(result.output.split())
    assert f"grad_spike at step {T}" in output and "no finite loss recorded" in output
    # Without a loss the aftermath cannot be judged, so the incident is never called minor.
    assert result.exit_code == 1 and "lasting damage could not be judged" in output, result.output


def test_a_csv_without_a_step_column_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("loss\n1.0\n2.0\n")
    assert "no step column" in one_error_line(_analyze(path))


# ------------------------------------------------------------------------------------ demo


def test_demo_trains_a_run_and_diagnoses_its_planted_bad_batch(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "meta.json").exists()
    diagnosis = json.loads(_analyze(tmp_path / "demo", "--json").output)
    [incident] = diagnosis["incidents"]
    assert (incident["onset_step"], incident["cause"]) == (170, "bad_batch")
    assert "bad_batch" in result.output and "step 170" in result.output
    page = tmp_path / "demo.html"  # the HTML report, next to the run
    assert f"The HTML report (plots, each incident explained): {page}" in " ".join(result.output.split())
    html = page.read_text()
    assert html.lower().startswith("<!doctype html>") and "step 170" in html and "bad_batch" in html


def test_demo_rejects_an_unknown_fault_with_one_line(tmp_path):
    line = one_error_line(runner.invoke(app, ["demo", "--fault", "gremlins", "--out", str(tmp_path / "d")]))
    assert "unknown --fault 'gremlins'" in line and "bad_batch_long" in line
    assert not (tmp_path / "d").exists()


def test_demo_leaves_an_existing_directory_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = one_error_line(runner.invoke(app, ["demo", "--out", str(mine)]))
    assert "already exists and is not an empty directory" in line
    assert (mine / "notes.txt").read_text() == "keep me"


def test_progress_shows_on_a_terminal_and_never_in_a_pipe(tmp_path):
    import os
    import pty
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-c", "from spikedoc.cli import main; main()", "report", str(SAMPLE_RUNS / "lr_surge"), "-o"]
    env = {**os.environ, "PYTHONPATH": str(root), "TERM": "xterm"}
    piped = subprocess.run([*args, str(tmp_path / "a.html")], env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "loading" not in piped.stdout + piped.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*args, str(tmp_path / "b.html")], env=env, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    assert b"loading" in seen and b"analysing" in seen and b"Wrote" in seen


@pytest.mark.parametrize("module", ["spikedoc", "spikedoc.cli"])
def test_python_m_runs_the_cli_with_its_exit_codes(module):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = [sys.executable, "-m", module, "analyze"]
    found = subprocess.run([*run, str(SAMPLE_RUNS / "lr_surge"), "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 1 and "needs attention" in found.stdout, found.stdout + found.stderr
    missing = subprocess.run([*run, str(SAMPLE_RUNS / "no_such_run")], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error:"), missing.stdout + missing.stderr


@pytest.mark.parametrize("args", [["analyze", "--html", "run"], ["analyze"], ["diagnose", "run"]])
def test_a_command_line_that_does_not_parse_is_one_error_line_and_exit_2(args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "COLUMNS": "80"}
    found = subprocess.run([sys.executable, "-m", "spikedoc", *args], env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 2
    assert found.stderr.startswith("error:") and len(found.stderr.strip().splitlines()) == 1, found.stderr
    assert "--help" in found.stderr and found.stdout == ""
