"""Specification of RunWriter: Parquet parts written off-thread, crash-safe, never raising."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import spikedoc
from spikedoc.store.schema import FORMAT_VERSION
from spikedoc.store.writer import RunWriter

NAMES = ["blocks.0.attn.weight", "blocks.0.mlp.weight", "embed.weight", "head.weight"]
REPO = Path(__file__).resolve().parent.parent


def _record(writer: RunWriter, steps: range, *, segment_loss: float = 2.0) -> None:
    for step in steps:
        writer.add_step({"step": step, "loss": segment_loss + 0.01 * step, "grad_norm": np.float32(1.5),
                         "lr": 1e-3, "sample_ids": [f"s{step}a", step], "sample_losses": [0.5, 0.25]})  # fmt: skip
        n = len(NAMES)
        writer.add_layers({"step": np.full(n, step, dtype=np.int64), "name": list(reversed(NAMES)),
                           "grad_norm": np.arange(n, dtype=np.float32) + step,
                           "exp_avg_norm": np.ones(n, dtype=np.float32)})  # fmt: skip


def _parts(run_dir: Path, table: str) -> list[Path]:
    return sorted((run_dir / table / "rank=0").glob("part-*.parquet"))


def _read(run_dir: Path, table: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in _parts(run_dir, table)], promote_options="default")


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_open_writes_meta_with_format_version_and_first_segment(tmp_path):
    writer = RunWriter(tmp_path / "run")
    assert writer.open({"model": "tiny", "start_step": 0}) == 0
    writer.close()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model"] == "tiny"
    assert [(s["segment"], s["start_step"]) for s in meta["segments"]] == [(0, 0)]


def test_steps_layers_and_events_round_trip_through_load(tmp_path):
    writer = RunWriter(tmp_path, flush_every=4)
    writer.open({"model": "tiny"})
    _record(writer, range(10))
    writer.add_event("checkpoint", 9, path="ckpt-9.pt", loss=2.09)
    writer.close()
    run = spikedoc.load(tmp_path)
    assert run.source == "spikedoc" and run.meta["model"] == "tiny"
    assert run.steps["step"].tolist() == list(range(10))
    assert run.steps["loss"].to_numpy() == pytest.approx([2.0 + 0.01 * s for s in range(10)], rel=1e-6)
    assert list(run.steps["sample_ids"].iloc[3]) == ["s3a", "3"]  # ids are stored as strings
    assert list(run.steps["sample_losses"].iloc[3]) == [0.5, 0.25]
    assert (run.steps["segment"] == 0).all() and (run.steps["rank"] == 0).all()
    layers = run.layers()
    assert len(layers) == 10 * len(NAMES)
    assert layers.loc[(layers["step"] == 7) & (layers["name"] == NAMES[0]), "grad_norm"].item() == 7 + len(NAMES) - 1
    events = run.events
    assert [(e.kind, e.step, json.loads(e.detail)) for e in events.itertuples()] == [
        ("checkpoint", 9, {"path": "ckpt-9.pt", "loss": 2.09})
    ]


def test_a_leftover_temporary_part_is_ignored_by_the_reader(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    _record(writer, range(3))
    writer.close()
    (tmp_path / "steps" / "rank=0" / ".part-0-000001.parquet.tmp").write_bytes(b"PAR1 half-written")
    run = spikedoc.load(tmp_path)
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.warnings == []


def test_opening_removes_the_temporaries_a_killed_writer_of_its_rank_left(tmp_path):
    mine = [tmp_path / "steps" / "rank=0" / ".part-0-000001.parquet.tmp", tmp_path / "layers" / "rank=0" / ".part-0-000001.parquet.tmp",
            tmp_path / ".meta.json.tmp", tmp_path / "live" / "steps-rank=0.parquet"]
    theirs = tmp_path / "steps" / "rank=1" / ".part-0-000004.parquet.tmp"  # another rank's write, perhaps under way
    for path in [*mine, theirs]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1 half-written")
    writer = RunWriter(tmp_path)
    writer.open({})
    writer.close()
    assert [p for p in mine if p.exists()] == [] and theirs.exists()


def test_parts_are_zstd_with_float32_measurements_and_dictionary_encoded_names(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    _record(writer, range(3))
    writer.close()
    layers = pq.ParquetFile(_parts(tmp_path, "layers")[0])
    schema = layers.schema_arrow
    assert schema.field("step").type == pa.int64()
    assert schema.field("grad_norm").type == pa.float32()
    assert schema.field("exp_avg_norm").type == pa.float32()
    group = layers.metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert all(c.compression == "ZSTD" for c in columns.values())
    assert "RLE_DICTIONARY" in columns["name"].encodings
    steps = pq.read_schema(_parts(tmp_path, "steps")[0])
    assert steps.field("loss").type == pa.float32()
    assert steps.field("grad_norm").type == pa.float32()
    assert steps.field("time").type == pa.float64()
    assert steps.field("segment").type == pa.int32()


def test_layer_rows_are_sorted_by_step_then_name_in_row_groups_of_row_group_steps(tmp_path):
    writer = RunWriter(tmp_path, flush_every=1000, row_group_steps=5)
    writer.open({})
    _record(writer, range(20))
    writer.close()
    (part,) = _parts(tmp_path, "layers")
    table = pq.read_table(part)
    keys = list(zip(table["step"].to_pylist(), table["name"].to_pylist()))
    assert keys == sorted(keys)
    meta = pq.ParquetFile(part).metadata
    assert meta.num_row_groups == 4
    ranges = [(meta.row_group(i).column(0).statistics.min, meta.row_group(i).column(0).statistics.max)
              for i in range(meta.num_row_groups)]  # fmt: skip
    assert ranges == [(0, 4), (5, 9), (10, 14), (15, 19)]


def test_each_batch_of_flush_every_steps_shares_one_part_number_across_tables(tmp_path):
    writer = RunWriter(tmp_path, flush_every=5, flush_seconds=3600)
    writer.open({})
    _record(writer, range(6))  # the 6th step row closes the first batch of 5
    _wait_for(lambda: len(_parts(tmp_path, "layers")) == 1)
    _record(writer, range(6, 8))
    writer.add_event("checkpoint", 7)
    _record(writer, range(8, 12))
    writer.close()
    assert [pq.read_table(p)["step"].to_pylist() for p in _parts(tmp_path, "steps")] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11],
    ]
    layer_steps = [sorted(set(pq.read_table(p)["step"].to_pylist())) for p in _parts(tmp_path, "layers")]
    assert layer_steps == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    assert [p.name for p in _parts(tmp_path, "events")] == ["part-0-000001.parquet"]  # the batch of step 7


def test_buffered_rows_are_written_after_flush_seconds(tmp_path):
    writer = RunWriter(tmp_path, flush_every=1000, flush_seconds=0.2)
    writer.open({})
    _record(writer, range(3))
    _wait_for(lambda: len(_parts(tmp_path, "steps")) == 1)
    assert _read(tmp_path, "steps").num_rows == 3
    writer.close()


def test_flush_writes_buffered_rows_without_closing(tmp_path):
    writer = RunWriter(tmp_path, flush_every=1000, flush_seconds=3600)
    writer.open({})
    _record(writer, range(3))
    writer.flush()
    _wait_for(lambda: len(_parts(tmp_path, "layers")) == 1)
    assert _read(tmp_path, "layers").num_rows == 3 * len(NAMES)
    writer.close()


def test_no_temporary_files_are_left_after_close(tmp_path):
    writer = RunWriter(tmp_path, flush_every=2)
    writer.open({})
    _record(writer, range(9))
    writer.close()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix == ".tmp")]
    assert leftovers == []
    assert len(_parts(tmp_path, "steps")) >= 1


def test_close_is_idempotent_and_later_rows_are_counted_as_dropped(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    _record(writer, range(2))
    writer.close()
    writer.close()
    writer.add_step({"step": 2, "loss": 1.0})
    assert writer.dropped_rows == 1
    assert _read(tmp_path, "steps").num_rows == 2


def test_appending_to_a_run_starts_the_next_segment_and_keeps_earlier_parts(tmp_path):
    first = RunWriter(tmp_path)
    assert first.open({"model": "tiny"}) == 0
    _record(first, range(5))
    first.close()
    second = RunWriter(tmp_path)
    assert second.open({"resumed_from": "ckpt-3.pt", "start_step": 3}) == 1
    _record(second, range(3, 6))
    second.close()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["model"] == "tiny" and meta["resumed_from"] == "ckpt-3.pt"
    assert [s["segment"] for s in meta["segments"]] == [0, 1]
    assert meta["segments"][1]["start_step"] == 3
    steps = _read(tmp_path, "steps").to_pandas()
    assert sorted(zip(steps["segment"], steps["step"])) == [(0, s) for s in range(5)] + [(1, s) for s in range(3, 6)]
    assert {p.name.split("-")[1] for p in _parts(tmp_path, "layers")} == {"0", "1"}


def test_a_writer_forced_onto_an_existing_segment_continues_its_part_numbers(tmp_path):
    for steps in (range(3), range(3, 6)):
        writer = RunWriter(tmp_path)
        assert writer.open({"segment": 0}) == 0
        _record(writer, steps)
        writer.close()
    assert [p.name for p in _parts(tmp_path, "steps")] == ["part-0-000000.parquet", "part-0-000001.parquet"]
    assert _read(tmp_path, "steps")["step"].to_pylist() == list(range(6))


def test_only_rank_zero_writes_meta_and_each_rank_its_own_partition(tmp_path):
    writer = RunWriter(tmp_path, rank=3)
    writer.open({"model": "tiny"})
    _record(writer, range(2))
    writer.close()
    assert not (tmp_path / "meta.json").exists()
    assert [p.parent.name for p in (tmp_path / "steps").glob("*/part-*.parquet")] == ["rank=3"]


def test_a_run_of_a_newer_format_is_not_appended_to(tmp_path, caplog):
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    writer = RunWriter(tmp_path)
    writer.open({})
    _record(writer, range(2))
    writer.close()
    assert json.loads((tmp_path / "meta.json").read_text()) == {"format_version": FORMAT_VERSION + 1}
    assert not (tmp_path / "steps").exists()
    assert writer.dropped_rows == 2 + 2 * len(NAMES)
    assert any("newer" in r.getMessage() for r in caplog.records)


def test_extra_scalars_become_columns_and_all_null_columns_are_typed(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    writer.add_step({"step": 0, "loss": 1.0, "tokens_per_s": 1234.5, "epoch": 1, "loss_scale": None, "custom": None})
    writer.close()
    schema = pq.read_schema(_parts(tmp_path, "steps")[0])
    assert schema.field("tokens_per_s").type == pa.float32()
    assert schema.field("epoch").type == pa.int64()
    assert schema.field("loss_scale").type == pa.float32()
    assert schema.field("custom").type != pa.null()


def test_a_bad_value_costs_its_cell_not_the_row(tmp_path, caplog):
    writer = RunWriter(tmp_path)
    writer.open({})
    writer.add_step({"step": 0, "loss": "not a number", "grad_norm": 2.0})
    writer.add_step({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    writer.close()
    steps = _read(tmp_path, "steps").to_pylist()
    assert steps[0]["loss"] is None and steps[0]["grad_norm"] == 2.0
    assert np.isnan(steps[1]["loss"]) and steps[1]["grad_norm"] == float("inf")  # non-finite is data
    assert writer.dropped_rows == 0
    assert any("'loss'" in r.getMessage() for r in caplog.records)


def test_a_malformed_layer_block_is_dropped_and_counted_without_raising(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    writer.add_layers({"step": np.zeros(3, dtype=np.int64), "name": ["a", "b"], "grad_norm": np.ones(3)})
    _record(writer, range(1))
    writer.close()
    assert writer.dropped_rows == 3
    assert _read(tmp_path, "layers").num_rows == len(NAMES)


def test_a_layer_block_that_cannot_be_converted_costs_only_its_own_rows(tmp_path):
    writer = RunWriter(tmp_path)
    writer.open({})
    _record(writer, range(2))
    writer.add_layers({"step": np.array([2, 2]), "name": ["a", "b"], "grad_norm": np.array(["high", "low"])})
    writer.close()
    assert writer.dropped_rows == 2
    assert sorted(set(_read(tmp_path, "layers")["step"].to_pylist())) == [0, 1]


def test_unwritable_run_dir_warns_once_counts_dropped_rows_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    run_dir = blocker / "run"  # a path under a regular file cannot be created, even by root
    caplog.set_level(logging.WARNING)
    writer = RunWriter(run_dir, flush_every=2, flush_seconds=3600)
    writer.open({"model": "tiny"})
    _record(writer, range(2))
    writer.flush()
    _wait_for(lambda: writer.dropped_rows >= 2)
    _record(writer, range(2, 4))
    writer.flush()  # a second failing flush: retried, but not warned about again
    _wait_for(lambda: writer.dropped_rows >= 4)
    writer.close()
    assert writer.dropped_rows == 4 + 4 * len(NAMES)  # steps and layer rows of both flushes
    failures = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert len(failures) == 1
    assert str(run_dir) in failures[0]


def test_pending_rows_are_capped_and_the_excess_counted(tmp_path):
    writer = RunWriter(tmp_path, flush_every=10**6, flush_seconds=3600, max_pending_rows=50)
    writer.open({})
    for step in range(80):
        writer.add_step({"step": step, "loss": 1.0})
    assert writer.dropped_rows == 30
    writer.close()
    assert _read(tmp_path, "steps")["step"].to_pylist() == list(range(50))


def test_invalid_options_name_the_option():
    with pytest.raises(ValueError, match="flush_every"):
        RunWriter("unused", flush_every=0)
    with pytest.raises(ValueError, match="flush_seconds"):
        RunWriter("unused", flush_seconds=0)


def test_rows_still_buffered_at_interpreter_exit_are_written(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from spikedoc.store.writer import RunWriter
        writer = RunWriter(sys.argv[1], flush_every=1000, flush_seconds=3600)
        writer.open({})
        for step in range(7):
            writer.add_step({"step": step, "loss": 1.0, "sample_ids": ["a"], "sample_losses": [0.5]})
            writer.add_layers({"step": np.full(2, step), "name": ["b", "a"], "grad_norm": np.ones(2)})
        writer.add_event("checkpoint", 6, path="x.pt")
        # no close(): the interpreter exits with the rows still buffered
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, timeout=120, check=False,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "could not" not in done.stderr, done.stderr
    run = spikedoc.load(tmp_path)
    assert run.steps["step"].tolist() == list(range(7))
    assert len(run.layers()) == 14 and run.events["kind"].tolist() == ["checkpoint"]


_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from spikedoc.store.writer import RunWriter
    writer = RunWriter(sys.argv[1], flush_every=5, flush_seconds=3600)
    writer.open({"model": "killed"})
    step = 0
    while True:
        writer.add_step({"step": step, "loss": 1.0 / (step + 1)})
        writer.add_layers({"step": np.full(3, step), "name": ["a", "b", "c"], "grad_norm": np.ones(3)})
        step += 1
        time.sleep(0.002)
    """
)


def test_sigkill_while_writing_leaves_only_complete_readable_parts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, str(run_dir)], cwd=REPO)
    try:
        _wait_for(lambda: len(_parts(run_dir, "layers")) >= 4, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    completed = sum(pq.ParquetFile(p).metadata.num_rows for p in _parts(run_dir, "steps"))
    run = spikedoc.load(run_dir)
    assert run.warnings == []
    assert len(run.steps) == completed >= 20  # every completed part, nothing half-written
    assert run.steps["step"].tolist() == list(range(completed))
    assert run.meta["model"] == "killed"
    assert run.layers()["step"].max() < completed  # layer parts are written after their step part
