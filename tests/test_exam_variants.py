"""The exam's faults on real tiny runs the exam does not hold (other seeds, steps and setups): the
cause rules behave on variants they were not fitted to."""

from __future__ import annotations

import pytest

import spikedoc
from bench._exam_train import Fault, Setup, train
from spikedoc.analysis.detect import find_incidents
from spikedoc.report.terminal import action_text
from spikedoc.store.reader import load


def _trained(tmp_path, setup: Setup, fault: Fault):
    train(setup, fault, tmp_path / "run", tmp_path / "ckpt")
    return tmp_path / "run"


def _actions(incident) -> list[str]:
    return [a["action"] for a in incident.recommendation["actions"]]


@pytest.mark.parametrize("kind, step", [("loss_inf", 80), ("loss_nan", 95), ("weight_inf", 64)])
def test_a_nan_long_after_an_early_gradient_spike_that_came_back_is_numerics(tmp_path, kind, step):
    # No warmup to speak of: the gradient norm spikes in the first steps and is back in its band
    # within a few; the non-finite value comes tens of steps later, with nothing building up to it.
    run = _trained(tmp_path, Setup(seed=4005, optimizer="adam", warmup=6), Fault(family="nonfinite", kind=kind, step=step))
    early = [i for i in find_incidents(load(run).steps) if i.kind == "grad_spike" and i.onset_step < step - 20]
    assert early and all(i.series["grad_norm"]["recovered"] for i in early)  # the case this test is about
    incident = next(i for i in spikedoc.analyze(run).incidents if i.kind == "nonfinite")
    assert (incident.onset_step, incident.cause) == (step, "numerics_rank")
    assert not {"lower_lr", "tighten_clip"} & set(_actions(incident))


@pytest.mark.parametrize("setup, kind, step", [
    (Setup(seed=12, optimizer="sgd", lr_scale=1.5, warmup=24, output="logits", checkpoints="numbered"), "weight_inf", 37),
    (Setup(seed=5509, optimizer="adamw", lr_scale=0.5, warmup=24, clip=0.5, batch=8), "loss_inf", 42),
])  # fmt: skip
def test_a_gradient_that_only_broke_at_the_nan_built_nothing_up(tmp_path, setup, kind, step):
    # Shortly after a long warmup some tensors' update ratios are off their history (the LR is at its
    # peak); their gradients grew only in that they went non-finite with the rest at the NaN.
    run = _trained(tmp_path, setup, Fault(family="nonfinite", kind=kind, step=step))
    incident = next(i for i in spikedoc.analyze(run).incidents if i.kind == "nonfinite")
    assert (incident.onset_step, incident.cause) == (step, "numerics_rank")


def test_a_nonfinite_value_without_build_up_is_never_advised_a_smaller_lr_or_clip(tmp_path):
    # A NaN gradient right after the warmup, with update ratios off their history (the LR ramp)
    # named as the state's doing: whatever cause that names, nothing grew before the NaN, so a smaller
    # step or a tighter clip would not have prevented it.
    setup, step = Setup(seed=5511, optimizer="sgd", warmup=24), 37
    run = _trained(tmp_path, setup, Fault(family="nonfinite", kind="grad_nan", step=step))
    incident = next(i for i in spikedoc.analyze(run).incidents if i.kind == "nonfinite")
    assert incident.onset_step == step
    actions = _actions(incident)
    assert "rollback" in actions and not {"lower_lr", "tighten_clip"} & set(actions)
    assert incident.recommendation["rollback_to_step"] <= step


def _without_layer_statistics(monkeypatch) -> None:
    """The exam's loop recorded with the step table's statistics only (no per-tensor rows after step 0)."""
    watch = spikedoc.watch
    monkeypatch.setattr("bench._exam_train.spikedoc.watch", lambda *a, **k: watch(*a, **{**k, "layer_every": 10**6}))


@pytest.mark.parametrize("setup, step", [
    (Setup(seed=68, optimizer="adamw", warmup=12), 70),
    (Setup(seed=82, optimizer="adamw", lr_scale=1.5, warmup=6, clip=1.0), 90),
    (Setup(seed=68, optimizer="adamw", warmup=12, checkpoints="numbered"), 79),
])  # fmt: skip
def test_a_state_change_dated_by_the_update_norm_alone_is_rolled_back_to_before_it(tmp_path, monkeypatch, setup, step):
    # Moments x100 before `step`: with no moments recorded, the update norm per unit LR dates the change
    # (the update of `step`), while the loss is flagged two steps later. The rollback goes to the state
    # before the update the changed state made, and no checkpoint written after it.
    _without_layer_statistics(monkeypatch)
    run = _trained(tmp_path, setup, Fault(family="optimizer_state", kind="scale_m", step=step))
    incident = next(i for i in spikedoc.analyze(run).incidents if step - 2 <= i.onset_step <= step + 3)
    assert incident.cause == "optimizer_state"
    assert incident.recommendation["rollback"] and incident.recommendation["rollback_to_step"] <= step


@pytest.mark.parametrize("setup, step, length", [
    (Setup(seed=3020, d_model=48, batch=16, accum=2, warmup=6, clip=1.0, checkpoints="numbered"), 63, 6),
    (Setup(seed=3024, n_layer=3, batch=16, accum=2, lr_scale=1.5, warmup=12), 82, 5),
])
def test_a_stretch_of_partly_garbled_batches_is_bad_data_and_skipped_whole(tmp_path, setup, step, length):
    # 30% of the bytes replaced: no batch's distinct-token ratio is far off alone, the stretch's together are.
    run = _trained(tmp_path, setup, Fault(family="bad_batch", kind="noise", step=step, length=length))
    incident = next(i for i in spikedoc.analyze(run).incidents if step - 2 <= i.onset_step <= step + length)
    assert incident.cause == "bad_batch"
    skip = next(a for a in incident.recommendation["actions"] if a["action"] == "skip_data")
    assert set(skip["steps"]) <= set(range(step, step + length)) and len(skip["steps"]) >= 3


@pytest.mark.parametrize("setup, step", [
    (Setup(seed=5101, optimizer="adam", warmup=24, n_layer=1, d_model=16), 29),
    (Setup(seed=5103, optimizer="adamw", warmup=24, clip=1.0), 30),
])
def test_moments_blown_up_right_after_warmup_are_the_optimizer_state_not_the_lr(tmp_path, setup, step):
    # Too early for the update-norm level test's history; the step-to-step jump of the update per unit
    # LR, with a gradient that did not jump, still dates the state change to the step before onset.
    run = _trained(tmp_path, setup, Fault(family="optimizer_state", kind="scale_m", step=step))
    incident = next(i for i in spikedoc.analyze(run).incidents if step - 2 <= i.onset_step <= step + 2)
    assert incident.cause == "optimizer_state"


@pytest.mark.parametrize("setup, kind, step", [
    (Setup(seed=5201, optimizer="adam", warmup=12), "zero_v", 70),
    (Setup(seed=5203, optimizer="adamw", warmup=6, clip=1.0, d_model=48), "zero_v", 95),
    (Setup(seed=5205, optimizer="adamw", warmup=24, n_layer=3, batch=16, accum=2), "zero_v", 52),
    (Setup(seed=5303, optimizer="sgd", warmup=6, clip=1.0), "scale_m", 66),
    (Setup(seed=5307, optimizer="sgd", warmup=24, n_layer=3), "scale_m", 58),
])  # fmt: skip
def test_moments_written_from_outside_are_a_writer_to_find_not_an_lr_or_clip_to_tune(tmp_path, setup, kind, step):
    # Zeroed exp_avg_sq fell further in one step than beta2 lets an update shrink it; a momentum x100
    # grew by far more than the gradient its update adds.
    run = _trained(tmp_path, setup, Fault(family="optimizer_state", kind=kind, step=step))
    incident = next(i for i in spikedoc.analyze(run).incidents if step - 2 <= i.onset_step <= step + 3)
    assert incident.cause == "optimizer_state"
    actions = _actions(incident)
    assert "find_state_writer" in actions and not {"lower_lr", "tighten_clip", "reset_moments"} & set(actions)


@pytest.mark.parametrize("setup, step", [
    (Setup(seed=6101, optimizer="sgd", warmup=12, n_layer=1), 70),
    (Setup(seed=6103, optimizer="adamw", warmup=6, batch=8, d_model=48), 88),
])
def test_an_lr_raised_for_one_step_is_reported_as_a_jump(tmp_path, setup, step):
    # The LR x20 for one step and back: the change up and the change back, side by side, are one jump
    # and its return, not each other's schedule.
    run = _trained(tmp_path, setup, Fault(family="lr_surge", kind="surge", step=step, length=1, factor=20.0))
    finding = next(f for f in spikedoc.analyze(run).findings if f.id == "lr_discontinuity")
    assert [j["step"] for j in finding.details["jumps"]] == [step]


def test_a_loss_that_rises_after_a_one_step_lr_surge_is_an_lr_schedule_incident(tmp_path):
    setup = Setup(seed=6105, optimizer="adam", warmup=24, steps=150, clip=1.0)
    run = _trained(tmp_path, setup, Fault(family="lr_surge", kind="surge", step=100, length=1, factor=25.0))
    incident = next(i for i in spikedoc.analyze(run).incidents if 98 <= i.onset_step <= 102)
    assert incident.cause == "lr_schedule"


@pytest.mark.parametrize("setup, step", [
    (Setup(seed=7003, optimizer="sgd", warmup=6, clip=0.5, lr_scale=1.5), 58),
    (Setup(seed=7005, optimizer="adam", warmup=12, n_layer=3, batch=8), 74),
])
def test_one_noisy_batch_while_the_loss_still_falls_is_found_as_bad_batch(tmp_path, setup, step):
    # 30% of the bytes replaced in one batch: its loss is far above the trajectory, but the detector's
    # band, whose window holds the loss's own fall, is wider still.
    run = _trained(tmp_path / "fault", setup, Fault(family="bad_batch", kind="noise", step=step))
    assert not [i for i in find_incidents(load(run).steps) if abs(i.onset_step - step) <= 2]  # the case this test is about
    incident = next(i for i in spikedoc.analyze(run).incidents if abs(i.onset_step - step) <= 2)
    assert incident.cause == "bad_batch"
    twin = spikedoc.analyze(_trained(tmp_path / "clean", setup, None))
    assert all(i.severity == "minor" for i in twin.incidents)


def _light_steps(run, first: int, last: int) -> None:
    """Blank the full statistics of steps `first..last` as a cost budget's light steps leave them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = ("param_norm", "update_norm", "update_ratio", "grad_max", "exp_avg_norm", "exp_avg_sq_mean", "exp_avg_sq_max", "eps_frac")
    for part in sorted((run / "layers").rglob("*.parquet")):
        table = pq.read_table(part)
        light = pa.array(np.isin(table.column("step").to_numpy(), np.arange(first, last + 1)))
        for name in full:
            if name in table.column_names:
                i = table.column_names.index(name)
                blank = pa.nulls(len(table), table.schema.field(i).type)
                table = table.set_column(i, table.schema.field(i), pa.compute.if_else(light, blank, table.column(i)))
        pq.write_table(table, part)


@pytest.mark.parametrize("setup, step, gap", [
    (Setup(seed=5207, optimizer="adamw", warmup=10), 74, (66, 73)),
    (Setup(seed=5209, optimizer="adam", warmup=8, d_model=48, clip=1.0), 91, (84, 90)),
])  # fmt: skip
def test_a_state_write_inside_a_gap_of_the_state_statistics_is_dated_to_the_gap_not_its_first_step(tmp_path, setup, step, gap):
    # The gap ends at the write (one reaching past it can hide it: the large gradients after it refill the moments).
    run = _trained(tmp_path, setup, Fault(family="optimizer_state", kind="zero_v", step=step))
    _light_steps(run, *gap)
    incident = next(i for i in spikedoc.analyze(run).incidents if step - 2 <= i.onset_step <= step + 3)
    writer = next(a for a in incident.recommendation["actions"] if a["action"] == "find_state_writer")
    assert writer["step"] <= step <= writer["seen"] and writer["seen"] > writer["step"]
    assert action_text(writer).startswith(f"find what wrote the optimizer state between steps {writer['step']} and {writer['seen']}")
