"""watch(..., tensorboard=DIR): the run mirrored live, read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import spikedoc
from tests.common.models import make_model, train


def test_a_watched_run_is_mirrored_to_tensorboard_with_the_exported_tags(tmp_path):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", tensorboard=tmp_path / "tb", flush_every=5)
    train(model, opt, 12)
    monitor.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    steps = spikedoc.load(tmp_path / "run").steps
    loss = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == steps["step"].tolist()
    assert loss == [float(v) for v in steps["loss"].astype("float32")]
    assert any(t.startswith("attention.grad_norm/") for t in tags) and any(t.startswith("mlp.update_ratio/") for t in tags)


def test_a_mirror_that_cannot_write_never_stops_training_or_the_parquet_run(tmp_path):
    (tmp_path / "tb").write_text("a file where the folder should be")
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="tensorboard failed"):
        monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", tensorboard=tmp_path / "tb")
    train(model, opt, 3)
    monitor.close()
    assert len(spikedoc.load(tmp_path / "run").steps) == 3
