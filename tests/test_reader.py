"""Specification of spikedoc.load for run directories: tables, windowed layers, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import spikedoc
from spikedoc.errors import RunFormatError, RunNotFoundError, UnsupportedVersionError
from spikedoc.store.reader import Run, load
from spikedoc.store.schema import FORMAT_VERSION
from spikedoc.store.writer import RunWriter

NAMES = ["embed.weight", "h.0.attn.weight", "h.0.mlp.weight", "head.weight"]


def _write_run(run_dir: Path, steps: range, *, rank: int = 0, flush_every: int = 100,
               row_group_steps: int = 256, layers: bool = True) -> None:  # fmt: skip
    writer = RunWriter(run_dir, rank=rank, flush_every=flush_every, row_group_steps=row_group_steps)
    writer.open({"model": "tiny"})
    for step in steps:
        writer.add_step({"step": step, "loss": 3.0 - 0.001 * step + rank, "grad_norm": 1.0})
        if layers:
            writer.add_layers({"step": np.full(len(NAMES), step), "name": NAMES,
                               "grad_norm": np.arange(len(NAMES), dtype=np.float32) * 1000 + step})  # fmt: skip
    writer.add_event("checkpoint", steps[-1], path=f"ckpt-{steps[-1]}.pt")
    writer.close()


def _parts(run_dir: Path, table: str) -> list[Path]:
    return sorted((run_dir / table).glob("rank=*/part-*.parquet"))


def _raised(path: Path, error: type[Exception]) -> str:
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    _write_run(tmp_path / "run", range(50), flush_every=20)
    return tmp_path / "run"


def test_load_is_the_public_spikedoc_load():
    assert spikedoc.load is load and spikedoc.Run is Run


def test_steps_of_all_parts_are_concatenated_in_step_order_with_a_rank_column(run_dir):
    run = load(run_dir)
    assert len(_parts(run_dir, "steps")) >= 3
    assert run.steps["step"].tolist() == list(range(50))
    assert run.steps["rank"].tolist() == [0] * 50
    assert run.steps["loss"].iloc[10] == pytest.approx(3.0 - 0.01)
    assert run.meta["format_version"] == FORMAT_VERSION


def test_steps_are_sorted_by_rank_segment_and_step_across_ranks_and_segments(tmp_path):
    _write_run(tmp_path, range(5), rank=1)
    _write_run(tmp_path, range(5), rank=0)
    _write_run(tmp_path, range(3, 6), rank=0)  # a resume of rank 0 from step 3: segment 1
    steps = load(tmp_path).steps
    keys = list(zip(steps["rank"], steps["segment"], steps["step"]))
    assert keys == sorted(keys)
    assert keys[:8] == [(0, 0, s) for s in range(5)] + [(0, 1, s) for s in range(3, 6)]
    assert set(steps.loc[steps["rank"] == 1, "loss"]) > {4.0}  # rank 1's own rows (loss + 1)


def test_parts_with_different_optional_columns_are_unioned(tmp_path):
    first = RunWriter(tmp_path)
    first.open({})
    first.add_step({"step": 0, "loss": 2.0, "epoch": 1})
    first.close()
    second = RunWriter(tmp_path)
    second.open({})
    second.add_step({"step": 1, "loss": 1.5, "loss_scale": 1024.0, "epoch": 1.5})
    second.close()
    steps = load(tmp_path).steps
    assert steps["loss_scale"].isna().tolist() == [True, False]
    assert steps["epoch"].tolist() == [1.0, 1.5]  # int64 in one part, float32 in the other


def test_events_are_loaded_with_their_json_detail(run_dir):
    events = load(run_dir).events
    assert list(events.columns[:5]) == ["step", "segment", "time", "kind", "detail"]
    assert events["kind"].tolist() == ["checkpoint"]
    assert json.loads(events["detail"].iloc[0]) == {"path": "ckpt-49.pt"}


def test_layers_returns_exactly_the_inclusive_step_window_and_requested_names(run_dir):
    run = load(run_dir)
    window = run.layers(first_step=18, last_step=22, names=["head.weight", "embed.weight"])
    assert list(zip(window["step"], window["name"])) == [
        (s, n) for s in range(18, 23) for n in ["embed.weight", "head.weight"]
    ]
    head = window[window["name"] == "head.weight"]
    assert head["grad_norm"].tolist() == [3000.0 + s for s in range(18, 23)]
    assert (window["rank"] == 0).all()


def test_layers_accepts_a_single_name_and_a_column_subset(run_dir):
    window = load(run_dir).layers(5, 6, names="head.weight", columns=["grad_norm"])
    assert window["name"].tolist() == ["head.weight", "head.weight"]
    assert set(window.columns) == {"step", "segment", "name", "grad_norm", "rank"}


def test_layers_without_bounds_returns_the_whole_table(run_dir):
    assert len(load(run_dir).layers()) == 50 * len(NAMES)


def test_layers_reads_only_row_groups_whose_statistics_overlap_the_window(tmp_path):
    _write_run(tmp_path, range(400), flush_every=100, row_group_steps=10)
    run = load(tmp_path)
    start, stop = 155, 172
    overlapping = total = 0
    for part in _parts(tmp_path, "layers"):
        meta = pq.ParquetFile(part).metadata
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(0).statistics  # column 0 is `step`
            total += 1
            overlapping += stats.min <= stop and stats.max >= start
    window = run.layers(start, stop)
    assert sorted(set(window["step"])) == list(range(start, stop + 1))
    assert total >= 40
    assert run.layer_scan == {"files": 1, "row_groups": overlapping, "row_groups_total": total}
    assert overlapping < total


def test_a_run_without_layer_rows_has_no_layers_and_says_so(tmp_path):
    _write_run(tmp_path, range(5), layers=False)
    run = load(tmp_path)
    assert not run.has_layers
    assert "layers" in run.missing
    assert run.layers(0, 3).empty


def test_a_leftover_temporary_file_is_ignored(run_dir):
    (run_dir / "layers" / "rank=0" / ".part-0-000099.parquet.tmp").write_bytes(b"PAR1\x00")
    run = load(run_dir)
    assert len(run.layers()) == 50 * len(NAMES)
    assert run.warnings == []


def test_missing_path_raises_run_not_found(tmp_path):
    assert "no such file" in _raised(tmp_path / "nope", RunNotFoundError)


def test_empty_directory_raises_run_not_found_describing_a_run_dir(tmp_path):
    message = _raised(tmp_path, RunNotFoundError)
    assert "empty" in message and "meta.json" in message


def test_foreign_directory_raises_run_not_found_describing_a_run_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    message = _raised(tmp_path, RunNotFoundError)
    assert "not a run" in message and "steps/rank=N/part-*.parquet" in message


def test_a_non_run_file_raises_run_not_found(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    assert "not a run" in _raised(tmp_path / "model.pt", RunNotFoundError)


def test_invalid_meta_json_raises_run_format_error(run_dir):
    (run_dir / "meta.json").write_text('{"format_version": 1, "model": ')
    assert "meta.json" in _raised(run_dir, RunFormatError)


def test_meta_json_without_format_version_raises_run_format_error(run_dir):
    (run_dir / "meta.json").write_text('{"model": "tiny"}')
    assert "format_version" in _raised(run_dir, RunFormatError)


def test_a_newer_format_version_raises_naming_both_versions(run_dir):
    (run_dir / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    message = _raised(run_dir, UnsupportedVersionError)
    assert f"format {FORMAT_VERSION + 1}" in message and f"format {FORMAT_VERSION}" in message


def test_a_truncated_step_part_is_skipped_with_a_warning_naming_it(run_dir, caplog):
    victim = _parts(run_dir, "steps")[1]
    kept = pq.ParquetFile(victim).metadata.num_rows
    victim.write_bytes(victim.read_bytes()[:-40])
    caplog.set_level(logging.WARNING)
    run = load(run_dir)
    assert len(run.steps) == 50 - kept
    assert len(run.warnings) == 1 and str(victim) in run.warnings[0]
    assert any(str(victim) in r.getMessage() for r in caplog.records)


def test_a_layer_part_cut_short_is_skipped_with_a_warning_at_load(run_dir):
    victim = _parts(run_dir, "layers")[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    run = load(run_dir)
    assert len(run.warnings) == 1 and str(victim) in run.warnings[0] and "attribution" in run.warnings[0]
    assert run.layers()["step"].min() == 20  # the first part (steps 0-19) is gone, the rest is there
    assert run.has_layers


def test_a_layer_part_with_a_corrupt_footer_is_skipped_with_a_warning_when_layers_are_read(run_dir):
    victim = _parts(run_dir, "layers")[0]
    victim.write_bytes(b"PAR1" + b"\xff" * 64 + (64).to_bytes(4, "little") + b"PAR1")  # a footer of garbage
    run = load(run_dir)
    assert run.warnings == []  # its last bytes look whole: found only when read
    assert run.layers()["step"].min() == 20
    assert len(run.warnings) == 1 and str(victim) in run.warnings[0]


def test_a_run_whose_layer_parts_are_all_cut_short_has_no_layers(run_dir):
    for part in _parts(run_dir, "layers"):
        part.write_bytes(b"PAR1")
    run = load(run_dir)
    assert not run.has_layers and "layers" in run.missing
    assert len(run.warnings) == len(_parts(run_dir, "layers"))


def test_a_run_whose_step_parts_are_all_corrupt_raises_run_format_error(run_dir):
    for part in _parts(run_dir, "steps"):
        part.write_bytes(b"garbage")
    assert "none of its" in _raised(run_dir, RunFormatError)


def test_a_run_with_no_step_rows_raises_run_format_error(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    assert "no step rows" in _raised(tmp_path, RunFormatError)


def test_a_steps_table_without_a_step_column_raises_run_format_error(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    writer.add_step({"loss": 1.0})
    writer.close()
    assert "'step'" in _raised(tmp_path, RunFormatError)


def test_layer_parts_written_by_other_tools_with_dictionary_names_are_read(run_dir):
    import pyarrow as pa

    extra = pa.table({"step": pa.array([50, 50], pa.int64()), "segment": pa.array([0, 0], pa.int32()),
                      "name": pa.array(["embed.weight", "head.weight"]).dictionary_encode(),
                      "grad_norm": pa.array([1.0, 2.0], pa.float32())})  # fmt: skip
    pq.write_table(extra, run_dir / "layers" / "rank=0" / "part-0-000099.parquet")
    window = load(run_dir).layers(49, 50)
    assert list(zip(window["step"], window["name"]))[-2:] == [(50, "embed.weight"), (50, "head.weight")]
    assert len(window) == len(NAMES) + 2


def test_a_column_that_appears_in_later_parts_is_unioned_across_many_parts(tmp_path):
    writer = RunWriter(tmp_path, flush_every=1)  # one part per step: more parts than one merged block
    writer.open({})
    for step in range(600):
        writer.add_step({"step": step, "loss": 2.0, **({"loss_scale": 1024.0} if step >= 590 else {})})
    writer.close()
    steps = load(tmp_path).steps
    assert steps["step"].tolist() == list(range(600))
    assert steps["loss_scale"].isna().sum() == 590 and (steps["loss_scale"].iloc[590:] == 1024.0).all()


def test_layer_parts_without_statistics_are_read_for_every_window(run_dir):
    import pyarrow as pa

    extra = pa.table({"step": pa.array([7, 60], pa.int64()), "segment": pa.array([0, 0], pa.int32()),
                      "name": pa.array(["late.weight", "late.weight"]),
                      "grad_norm": pa.array([1.0, 2.0], pa.float32())})  # fmt: skip
    pq.write_table(extra, run_dir / "layers" / "rank=0" / "part-0-000099.parquet", write_statistics=False)
    run = load(run_dir)
    assert run.layers(5, 8, names=["late.weight"])["step"].tolist() == [7]
    assert run.layers(55, 65)["step"].tolist() == [60]
    assert run.layer_scan["files"] == 1  # only the part without statistics could hold steps 55-65


def test_columns_describe_every_column_of_each_table_from_the_schema():
    import spikedoc
    from spikedoc.store.schema import EVENT_COLUMNS, LAYER_COLUMNS, STEP_COLUMNS

    assert tuple(spikedoc.columns()) == STEP_COLUMNS
    assert tuple(spikedoc.columns("layers")) == LAYER_COLUMNS and tuple(spikedoc.columns("events")) == EVENT_COLUMNS
    assert spikedoc.columns()["clip_coef"].startswith("float32, factor applied by clip=")
    with pytest.raises(ValueError, match="unknown table 'step'"):
        spikedoc.columns("step")
