"""Specification of the CSV and TensorBoard importers behind spikedoc.load."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import spikedoc
from spikedoc.errors import RunFormatError
from spikedoc.store.importers import ALIASES, read_csv, read_tensorboard
from spikedoc.store.reader import load

NEVER_IMPORTED = {"layers", "batch fingerprints", "events"}
REAL = Path(__file__).resolve().parent.parent / "sample_runs" / "real"


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "log.csv"
    path.write_text(text)
    return path


def _tensorboard(log_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, global_step=step)
    writer.close()


def test_csv_columns_are_mapped_through_the_alias_table(tmp_path):
    path = _csv(tmp_path, "iteration,lm loss,grad-norm,learning_rate,loss_scale,tokens per sec\n"
                          "1,3.5,1.25,0.001,65536,1000\n2,3.25,1.5,0.002,65536,1010\n")  # fmt: skip
    run = load(path)
    assert run.source == "csv"
    assert run.steps["step"].tolist() == [1, 2]
    assert run.steps["loss"].tolist() == [3.5, 3.25]
    assert run.steps["grad_norm"].tolist() == [1.25, 1.5]
    assert run.steps["lr"].tolist() == [0.001, 0.002]
    assert run.steps["loss_scale"].tolist() == [65536, 65536]
    assert run.steps["tokens_per_sec"].tolist() == [1000, 1010]  # unknown numeric columns are kept
    assert run.meta["renamed"]["lm loss"] == "loss"


@pytest.mark.parametrize("canonical", ["step", "loss", "grad_norm", "lr", "loss_scale"])
def test_every_documented_csv_alias_maps_to_its_canonical_column(tmp_path, canonical):
    for alias in ALIASES[canonical]:
        columns = [alias] if canonical == "step" else ["step", alias]
        path = _csv(
            tmp_path, ",".join(f'"{c.upper()}"' for c in columns) + "\n" + ",".join("7" for _ in columns) + "\n"
        )
        assert read_csv(path).steps[canonical].tolist() == [7], alias


def test_csv_empty_strings_and_nan_are_missing_values(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss,grad_norm\n0,2.0,\n1,nan,1.0\n2,,NaN\n"))
    assert run.steps["loss"].isna().tolist() == [False, True, True]
    assert run.steps["grad_norm"].isna().tolist() == [True, False, True]


def test_csv_rows_keep_file_order_and_a_step_going_back_starts_a_segment(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n0,3\n1,2.9\n2,2.8\n1,2.85\n2,2.75\n3,2.7\n0,9\n"))
    assert run.steps["step"].tolist() == [0, 1, 2, 1, 2, 3, 0]
    assert run.steps["segment"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert run.steps["loss"].iloc[3] == 2.85


def test_csv_rows_of_one_step_become_one_row_with_the_last_value_of_each_column(tmp_path):
    # Lightning's CSVLogger writes the training and the validation metrics of a step as two rows.
    run = read_csv(_csv(tmp_path, "step,train_loss,val_loss\n0,3,\n1,2.9,\n1,,3.1\n2,2.8,\n2,2.7,\n"))
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.steps["segment"].tolist() == [0, 0, 0]
    assert run.steps["loss"].tolist() == [3, 2.9, 2.7]
    assert run.steps["val_loss"].isna().tolist() == [True, False, True]
    assert len(run.warnings) == 1 and "1 steps were logged more than once with different values" in run.warnings[0]


def test_csv_repeated_rows_that_agree_merge_without_a_warning(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n0,3\n1,2.9\n1,2.9\n2,2.8\n"))
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.warnings == []


def test_csv_shuffled_rows_are_sorted_by_step_with_a_warning(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n3,2.7\n0,3\n4,2.6\n2,2.8\n1,2.9\n"))
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.steps["loss"].tolist() == [3, 2.9, 2.8, 2.7, 2.6]
    assert run.steps["segment"].tolist() == [0] * 5
    assert len(run.warnings) == 1 and "out of step order" in run.warnings[0] and "sorted by step" in run.warnings[0]


def test_csv_a_step_going_back_without_logging_earlier_steps_again_is_disorder_not_a_resume(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n0,3\n1,2.9\n3,2.7\n2,2.8\n4,2.6\n5,2.5\n"))
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert run.steps["segment"].tolist() == [0] * 6
    assert "out of step order" in run.warnings[0]


def test_csv_shuffled_rows_with_every_step_twice_give_one_row_per_step(tmp_path):
    rng = np.random.default_rng(0)
    steps = rng.permutation(np.repeat(np.arange(200), 2))
    path = _csv(tmp_path, "step,loss\n" + "".join(f"{s},{3 - s / 100}\n" for s in steps))
    run = read_csv(path)
    assert run.steps["step"].tolist() == list(range(200))
    assert run.steps["segment"].unique().tolist() == [0]
    assert run.steps["loss"].to_numpy() == pytest.approx(3 - np.arange(200) / 100)


def test_a_shuffled_csv_log_is_diagnosed_like_the_ordered_one(tmp_path):
    ordered = pd.read_csv(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")
    shuffled = ordered.sample(frac=1.0, random_state=0)
    shuffled = pd.concat([shuffled, shuffled.iloc[:500]])  # and some rows logged twice
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False)
    expected = spikedoc.analyze(REAL / "modded-nanogpt_2024-10-29_Optimizers_8bfe4e35.csv")
    got = spikedoc.analyze(tmp_path / "shuffled.csv")
    assert expected.incidents, "the real log has incidents to compare"
    assert [(i.onset_step, i.kind) for i in got.incidents] == [(i.onset_step, i.kind) for i in expected.incidents]
    assert got.summary["segments"] == 1
    assert any("sorted by step" in w for w in got.warnings)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("1.5", "is not a whole number"), ("1e30", "is out of range"), ("-1", "is out of range"),
     ("inf", "is out of range"), ("ten", "is not a number")],
)  # fmt: skip
def test_csv_step_that_is_not_a_whole_number_in_range_raises_naming_the_row_and_value(tmp_path, value, problem):
    path = _csv(tmp_path, f"step,loss\n0,3\n1,2.9\n{value},2.8\n3,2.7\n")
    with pytest.raises(RunFormatError) as info:
        read_csv(path)
    message = str(info.value)
    assert f"data row 3: step {value} {problem}" in message or (value == "1e30" and "step 1e+30 is out" in message)
    assert "\n" not in message


def test_csv_bad_step_error_counts_the_other_bad_rows(tmp_path):
    with pytest.raises(RunFormatError, match=r"data row 2: step 1.5 is not a whole number \(and 1 more rows like it\)"):
        read_csv(_csv(tmp_path, "step,loss\n0,3\n1.5,2.9\n2.7,2.8\n"))


def test_csv_rows_without_a_step_are_dropped_with_a_warning(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n0,3\n,2.9\n2,2.8\n"))
    assert run.steps["step"].tolist() == [0, 2]
    assert any("dropped 1 rows without a step value" in w for w in run.warnings)


def test_csv_with_a_segment_column_keeps_its_segments(tmp_path):
    run = read_csv(_csv(tmp_path, "step,segment,loss\n0,0,3\n1,0,2.9\n2,0,2.8\n1,1,2.85\n2,1,2.75\n"))
    assert list(zip(run.steps["segment"], run.steps["step"])) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]
    assert run.warnings == []


def test_csv_missing_reports_what_analysis_cannot_have(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss\n0,3\n1,2.9\n"))
    assert set(run.missing) == NEVER_IMPORTED | {"grad_norm", "lr"}
    assert not run.has_layers and run.layers(0, 1).empty


def test_csv_all_nan_column_counts_as_missing(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss,grad_norm\n0,3,\n1,2.9,nan\n"))
    assert "grad_norm" in run.missing


def test_csv_first_alias_wins_and_the_others_are_kept(tmp_path):
    run = read_csv(_csv(tmp_path, "step,train_loss,loss\n0,3.0,4.0\n"))
    assert run.steps["loss"].tolist() == [4.0]
    assert run.steps["train_loss"].tolist() == [3.0]


def test_csv_non_numeric_columns_are_dropped_with_a_warning(tmp_path):
    run = read_csv(_csv(tmp_path, "step,loss,phase\n0,3,warmup\n1,2.9,main\n"))
    assert "phase" not in run.steps.columns
    assert any("'phase'" in w for w in run.warnings)


def test_csv_without_a_step_column_raises_run_format_error(tmp_path):
    with pytest.raises(RunFormatError, match="no step column"):
        load(_csv(tmp_path, "epoch_time,loss\n0.5,3\n"))


def test_empty_csv_raises_run_format_error(tmp_path):
    with pytest.raises(RunFormatError, match="empty"):
        load(_csv(tmp_path, ""))


def test_tensorboard_scalars_are_mapped_and_unknown_tags_kept(tmp_path):
    _tensorboard(tmp_path / "tb", {
        "train/loss": [(s, 3.0 - 0.1 * s) for s in range(10)],
        "train/grad_norm": [(s, 1.0 + s) for s in range(10)],
        "train/learning_rate": [(s, 1e-3) for s in range(10)],
        "eval/accuracy": [(s, 0.5) for s in (4, 9)],
    })  # fmt: skip
    run = load(tmp_path / "tb")
    assert run.source == "tensorboard"
    assert run.steps["step"].tolist() == list(range(10))
    assert run.steps["loss"].to_numpy() == pytest.approx([3.0 - 0.1 * s for s in range(10)])
    assert run.steps["grad_norm"].tolist() == [1.0 + s for s in range(10)]
    assert run.steps["lr"].to_numpy() == pytest.approx([1e-3] * 10)
    accuracy = run.steps["eval_accuracy"]
    assert accuracy.notna().tolist() == [s in (4, 9) for s in range(10)]
    assert set(run.missing) == NEVER_IMPORTED


def test_tensorboard_event_files_are_found_in_subdirectories(tmp_path):
    _tensorboard(tmp_path / "logs" / "version_0", {"loss": [(0, 2.0), (1, 1.5)]})
    run = load(tmp_path / "logs")
    assert run.steps["loss"].tolist() == [2.0, 1.5]
    assert set(run.missing) == NEVER_IMPORTED | {"grad_norm", "lr"}


def test_tensorboard_restart_repeating_steps_starts_a_segment(tmp_path):
    _tensorboard(tmp_path, {"loss": [(s, 3.0 - 0.1 * s) for s in range(6)]})
    _tensorboard(tmp_path, {"loss": [(s, 5.0) for s in range(4, 8)]})  # a second process resumed at 4
    steps = read_tensorboard(tmp_path).steps
    assert list(zip(steps["segment"], steps["step"])) == [(0, s) for s in range(6)] + [(1, s) for s in range(4, 8)]
    assert steps.loc[steps["segment"] == 1, "loss"].tolist() == [5.0] * 4
    assert math.isclose(steps.loc[(steps["segment"] == 0) & (steps["step"] == 5), "loss"].item(), 2.5, rel_tol=1e-6)


def test_tensorboard_dir_without_scalars_raises_run_format_error(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_text("note", "no scalars here")
    writer.close()
    with pytest.raises(RunFormatError, match="no scalars"):
        load(tmp_path)


def test_tensorboard_sibling_directories_prefix_their_tags(tmp_path):
    _tensorboard(tmp_path / "train", {"loss": [(0, 2.0), (1, 1.5)]})
    _tensorboard(tmp_path / "eval", {"loss": [(1, 1.75)]})
    steps = load(tmp_path).steps
    assert steps["loss"].tolist() == [2.0, 1.5]  # train/loss is an alias of loss
    assert steps["eval_loss"].isna().tolist() == [True, False]


def test_a_single_event_file_can_be_loaded(tmp_path):
    _tensorboard(tmp_path, {"train_loss": [(0, 2.0), (1, 1.5)]})
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    assert load(event_file).steps["loss"].tolist() == [2.0, 1.5]


def test_tensorboard_tensor_scalars_of_the_tensorboard_summary_writer_are_read(tmp_path):
    from tensorboard.summary import Writer

    writer = Writer(str(tmp_path))
    for step in range(4):
        writer.add_scalar("lm-loss-training/lm loss", 3.0 - 0.25 * step, step=step)
        writer.add_scalar("grad-norm/grad-norm", 1.0 + step, step=step)
    writer.close()
    steps = load(tmp_path).steps
    assert list(steps.columns[:2]) == ["step", "segment"]
    assert steps["loss"].tolist() == [3.0, 2.75, 2.5, 2.25]
    assert steps["grad_norm"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_tensorboard_dir_of_two_runs_that_both_log_a_loss_raises_naming_them(tmp_path):
    _tensorboard(tmp_path / "logs" / "version_0", {"train_loss": [(0, 2.0), (1, 1.5)]})
    _tensorboard(tmp_path / "logs" / "version_1", {"train_loss": [(0, 2.1), (1, 1.6)]})
    with pytest.raises(RunFormatError) as info:
        load(tmp_path / "logs")
    message = str(info.value)
    assert "holds 2 TensorBoard runs that log a loss (version_0, version_1)" in message
    assert f"spikedoc analyze {tmp_path / 'logs' / 'version_1'}" in message and "\n" not in message


def test_tensorboard_dir_of_two_runs_of_which_one_logs_a_loss_reads_that_one(tmp_path):
    _tensorboard(tmp_path / "logs" / "pretrain", {"loss": [(0, 2.0), (1, 1.5)], "lr": [(0, 1e-3), (1, 1e-3)]})
    _tensorboard(tmp_path / "logs" / "probe", {"accuracy": [(0, 0.5), (5, 0.6)]})
    run = load(tmp_path / "logs")
    assert run.steps["step"].tolist() == [0, 1]
    assert run.steps["loss"].tolist() == [2.0, 1.5]
    assert "accuracy" not in run.steps.columns and "probe_accuracy" not in run.steps.columns
    assert run.warnings == ["logs holds 2 TensorBoard runs (pretrain, probe); analysed pretrain, the only one that "
                            "logs a loss".replace("logs", str(tmp_path / "logs"), 1)]
    assert all("pretrain" in f for f in run.meta["event_files"])


def test_tensorboard_run_in_the_top_folder_keeps_its_tags_beside_a_subfolder_run(tmp_path):
    _tensorboard(tmp_path, {"loss": [(0, 2.0), (1, 1.5)]})
    _tensorboard(tmp_path / "eval", {"loss": [(1, 1.75)]})
    steps = load(tmp_path).steps
    assert steps["loss"].tolist() == [2.0, 1.5]
    assert steps["eval_loss"].isna().tolist() == [True, False]


def test_csv_segment_that_is_not_a_whole_number_raises_naming_its_data_row(tmp_path):
    with pytest.raises(RunFormatError, match=r"data row 3: segment 0.5 is not a whole number"):
        read_csv(_csv(tmp_path, "step,segment,loss\n0,0,3\n,0,2.9\n2,0.5,2.8\n"))
