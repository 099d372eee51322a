"""Specification of `spikedoc tensorboard RUN LOGDIR`, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from typer.testing import CliRunner

import spikedoc
from spikedoc.cli import app
from tests.common.cli import one_error_line

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"
runner = CliRunner()


def _accumulator(logdir: Path) -> EventAccumulator:
    (event_file,) = logdir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> EventAccumulator:
    logdir = tmp_path_factory.mktemp("tb")
    result = runner.invoke(app, ["tensorboard", str(SAMPLES / "lr_surge"), str(logdir)])
    assert result.exit_code == 0, result.output
    return _accumulator(logdir)


def test_step_scalars_are_the_runs_values_at_every_step(exported):
    steps = spikedoc.load(SAMPLES / "lr_surge").steps
    for column in ("loss", "grad_norm", "lr"):
        points = exported.Scalars(f"train/{column}")
        assert [p.step for p in points] == steps["step"].tolist()
        np.testing.assert_allclose([p.value for p in points], steps[column].to_numpy(), rtol=1e-6)


def test_per_tensor_series_are_grouped_by_module_kind(exported):
    tags = exported.Tags()["scalars"]
    sections = {tag.split("/", 1)[0] for tag in tags}
    assert {"attention.grad_norm", "mlp.grad_norm", "norms.grad_norm", "embeddings.grad_norm"} <= sections
    assert {"attention.update_ratio", "attention.eps_frac"} <= sections
    layers = spikedoc.load(SAMPLES / "lr_surge").layers(names=["blocks.0.qkv.weight"])
    points = exported.Scalars("attention.grad_norm/blocks.0.qkv.weight")
    np.testing.assert_allclose([p.value for p in points], layers["grad_norm"].to_numpy(), rtol=1e-6)


def test_incidents_are_text_at_their_onset_step(exported):
    (event,) = exported.Tensors("incidents/1")
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    assert event.step == 152
    assert "lr_schedule" in text and "severe" in text and "(the state before step 150)" in text
    assert exported.Tensors("findings")


def test_the_export_reads_back_as_a_run_with_the_same_incident(tmp_path):
    runner.invoke(app, ["tensorboard", str(SAMPLES / "lr_surge"), str(tmp_path)])
    diagnosis = spikedoc.analyze(tmp_path)
    assert diagnosis.source == "tensorboard"
    assert [i.onset_step for i in diagnosis.incidents] == [152]


def test_missing_run_and_unwritable_logdir_are_one_line_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "nope"), str(tmp_path / "tb")], [str(tmp_path / "empty"), str(tmp_path / "tb")],
                 [str(SAMPLES / "lr_surge"), str(tmp_path / "file" / "tb")]):
        result = runner.invoke(app, ["tensorboard", *args])
        one_error_line(result)
