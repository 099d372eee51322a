"""Specification of the input gate (`spikedoc.store.validate`) as `spikedoc analyze` meets bad input.

Each bad input is made at test time from a real one: a run recorded by `spikedoc.watch` from a tiny
transformer on real text, a part of it cut short or written twice, a CSV with text among its numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app
from spikedoc.store import validate
from tests.common.models import make_model, train
from tests.common.planted import healthy_steps, write_run
from tests.common.cli import one_error_line

runner = CliRunner()
STEPS, FLUSH = 240, 40  # six parts: steps 0..39, 40..79, ...


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A real run: 240 AdamW steps of the tiny transformer, a part every 40 steps."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=run_dir, flush_every=FLUSH):
        train(model, opt, STEPS)
    return run_dir


@pytest.fixture
def run(recorded, tmp_path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "run"))


def _part(run: Path, table: str, seq: int) -> Path:
    return run / table / "rank=0" / f"part-0-{seq:06d}.parquet"


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _analyze(*args: object):
    return runner.invoke(app, ["analyze", *map(str, args)], env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------------------ holes


def test_the_whole_recorded_run_is_complete_and_exits_0(run):
    result = _analyze(run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["holes"] == []


def test_a_truncated_middle_steps_part_is_a_hole_named_first_with_exit_3(run):
    before = {p.name: p.read_bytes() for p in (run / "steps" / "rank=0").iterdir()}
    _cut_short(_part(run, "steps", 2))  # steps 80..119
    result = _analyze(run)
    assert result.exit_code == 3, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("Incomplete run: 1 hole"), result.output
    assert lines[2].startswith("  hole step rows of steps 80..119 missing (rank 0, segment 0): unreadable part ")
    # The reader changes nothing the user had.
    assert {p.name for p in (run / "steps" / "rank=0").iterdir()} == set(before)


def test_quiet_says_incomplete_and_the_missing_steps_not_healthy(run):
    _cut_short(_part(run, "steps", 2))
    result = _analyze(run, "--quiet")
    assert result.exit_code == 3, result.output
    assert "incomplete, steps 80..119 missing from the steps table" in result.output
    assert "healthy" not in result.output


def test_json_lists_each_hole_with_its_step_range(run):
    _cut_short(_part(run, "steps", 2))
    _cut_short(_part(run, "steps", 5))  # the last part: the hole reaches past the steps read
    holes = json.loads(_analyze(run, "--json").stdout)["holes"]
    assert [(h["table"], h["first_step"], h["last_step"]) for h in holes] == [("steps", 80, 119), ("steps", 200, None)]
    assert holes[1]["steps"] == "steps after 199"


def test_a_truncated_layers_part_is_a_hole_with_the_steps_of_its_batch(run):
    _cut_short(_part(run, "layers", 1))
    result = _analyze(run, "--quiet")
    assert result.exit_code == 3, result.output
    assert "incomplete, steps 40..79 missing from the layers table" in result.output


def test_steps_missing_from_a_log_are_a_hole(tmp_path):
    steps = healthy_steps(400)
    steps = steps.loc[(steps["step"] < 150) | (steps["step"] >= 230)]
    path = tmp_path / "log.csv"
    steps[["step", "loss", "lr"]].to_csv(path, index=False)
    result = _analyze(path, "--json")
    assert result.exit_code == 3, result.output
    (hole,) = json.loads(result.stdout)["holes"]
    assert (hole["first_step"], hole["last_step"], hole["cause"]) == (150, 229, "steps missing from the log")


def test_a_log_every_ten_steps_is_not_a_run_of_holes(tmp_path):
    steps = healthy_steps(600).iloc[::10]
    path = tmp_path / "log.csv"
    steps[["step", "loss", "lr"]].to_csv(path, index=False)
    result = _analyze(path, "--json")
    assert json.loads(result.stdout)["holes"] == [], result.output


def _grad_norm_rising_over(steps: pd.DataFrame, first: int, last: int) -> pd.DataFrame:
    """The grad norm triples along steps first..last, smoothly, and stays there."""
    ramp = np.clip((steps["step"] - first) / (last - first), 0, 1)
    return steps.assign(grad_norm=steps["grad_norm"] * 3.0**ramp)


def test_no_incident_is_inferred_across_a_hole(tmp_path):
    steps = _grad_norm_rising_over(healthy_steps(600), 200, 400)
    whole = write_run(tmp_path / "whole", steps)
    holed = write_run(tmp_path / "holed", steps.loc[(steps["step"] < 220) | (steps["step"] > 380)])
    # Recorded whole, the rise is gradual and the baseline follows it; across the missing steps the
    # same rise would be a jump at step 381 against a baseline from before the hole.
    assert _analyze(whole, "--quiet").exit_code == 0
    result = _analyze(holed, "--json")
    assert result.exit_code == 3, result.output
    assert json.loads(result.stdout)["incidents"] == []


# ------------------------------------------------------------------------------------- text cells


def _csv_with_text_losses(path: Path, every: int = 3) -> Path:
    steps = healthy_steps(300)
    loss = [("oops" if i % every == every - 1 else f"{v:.5f}") for i, v in enumerate(steps["loss"])]
    pd.DataFrame({"step": steps["step"], "loss": loss, "lr": steps["lr"]}).to_csv(path, index=False)
    return path


def test_text_in_a_csv_loss_column_is_one_error_line_naming_its_lines(tmp_path):
    line = one_error_line(_analyze(_csv_with_text_losses(tmp_path / "log.csv")))
    assert "column 'loss' has 100 cells that are not numbers (line 4: 'oops', line 7: 'oops', line 10: 'oops'" in line
    assert "--lenient" in line


def test_lenient_leaves_the_rows_with_text_losses_out_and_says_so(tmp_path):
    path = _csv_with_text_losses(tmp_path / "log.csv")
    result = _analyze(path, "--lenient", "--json")
    assert result.exit_code == 0, result.output
    diagnosis = json.loads(result.stdout)
    assert diagnosis["summary"]["steps"] == 200 and diagnosis["incidents"] == [] and diagnosis["holes"] == []
    assert any("read 100 cells of column 'loss' that are not numbers as missing (--lenient" in w
               for w in diagnosis["warnings"])


def test_text_in_a_parquet_loss_column_is_one_error_line_naming_the_part_and_row(run):
    path = _part(run, "steps", 1)
    table = pq.read_table(path)
    loss = table["loss"].to_pylist()
    loss[6] = "oops"
    table = table.set_column(table.schema.get_field_index("loss"), "loss", pa.array([str(v) for v in loss]))
    pq.write_table(table, path)
    line = one_error_line(_analyze(run))
    assert f"{path}: column 'loss' has 1 cells that are not numbers (row 7: 'oops')" in line


# -------------------------------------------------------------------------------- types and copies


def test_a_step_column_stored_as_strings_sorts_as_numbers(run):
    expected = spikedoc.load(run).steps
    for path in (run / "steps" / "rank=0").iterdir():
        table = pq.read_table(path)
        as_text = pa.array([str(s) for s in table["step"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("step"), "step", as_text), path)
    loaded = spikedoc.load(run)
    assert loaded.steps["step"].tolist() == list(range(STEPS))
    assert loaded.steps["loss"].tolist() == expected["loss"].tolist()
    assert _analyze(run, "--quiet").exit_code == 0


def test_a_step_that_is_not_a_whole_number_in_a_part_is_one_error_line(run):
    path = _part(run, "steps", 0)
    table = pq.read_table(path)
    steps = [str(s) for s in table["step"].to_pylist()]
    steps[3] = "3.5"
    pq.write_table(table.set_column(table.schema.get_field_index("step"), "step", pa.array(steps)), path)
    assert f"{path}, row 4: step 3.5 is not a whole number" in one_error_line(_analyze(run))


def test_a_part_written_twice_is_read_once_with_a_warning(run):
    expected = json.loads(_analyze(run, "--json").stdout)
    shutil.copy(_part(run, "steps", 2), _part(run, "steps", 9))  # the same steps again, written last
    result = _analyze(run, "--json")
    assert result.exit_code == 0, result.output
    diagnosis = json.loads(result.stdout)
    assert diagnosis["summary"]["steps"] == STEPS and diagnosis["incidents"] == expected["incidents"]
    (warning,) = [w for w in diagnosis["warnings"] if "repeat a (rank, segment, step)" in w]
    assert "40 rows" in warning and "kept the last row written" in warning


def test_two_writers_of_one_segment_keep_the_row_written_last(tmp_path):
    steps = healthy_steps(300)
    write_run(tmp_path / "run", steps, segment=0)
    write_run(tmp_path / "run", steps.assign(loss=steps["loss"] + 1.0).iloc[100:150], segment=0)
    loaded = spikedoc.load(tmp_path / "run")
    assert loaded.steps["step"].tolist() == list(range(300))
    assert loaded.steps["loss"].iloc[100:150].tolist() == pytest.approx((steps["loss"].iloc[100:150] + 1.0).tolist())
    assert any("50 rows repeat a (rank, segment, step)" in w for w in loaded.warnings)


# ------------------------------------------------------------------------------------------- size


def test_a_step_table_larger_than_memory_is_refused_before_loading(run, monkeypatch):
    monkeypatch.setattr(validate, "available_memory", lambda: 1000)  # bytes: less than the table
    line = one_error_line(_analyze(run))
    assert "holds more data than the 0.0 GiB of memory available" in line and "not loaded" in line


def test_a_csv_larger_than_memory_is_refused_before_loading(tmp_path, monkeypatch):
    path = _csv_with_text_losses(tmp_path / "log.csv", every=10**9)
    monkeypatch.setattr(validate, "available_memory", lambda: path.stat().st_size - 1)
    assert "not loaded" in one_error_line(_analyze(path))


def test_available_memory_is_read_from_the_machine():
    memory = validate.available_memory()
    assert memory is not None and memory > 0


def test_the_html_report_names_the_holes_first(run, tmp_path):
    _cut_short(_part(run, "steps", 2))
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<h2>Incomplete run</h2>" in page and "step rows of steps 80..119 missing" in page
    assert page.index("Incomplete run") < page.index("<h2>", page.index("Incomplete run") + 1)


def test_a_hole_outside_the_steps_asked_for_leaves_them_complete(run):
    _cut_short(_part(run, "steps", 4))  # steps 160..199
    assert _analyze(run, "--stop", "150", "--quiet").exit_code == 0
    assert _analyze(run, "--start", "150", "--quiet").exit_code == 3
