"""Specification of an incident's step-table context: LR jumps, warmup, clipping, loss scale, ranks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spikedoc.analysis.context import (
    clipping_before,
    loss_scale_drops,
    lr_at,
    lr_discontinuities,
    rank_divergence,
    update_without_grad,
    warmup,
)
from tests.common.planted import healthy_steps

T = 400


def test_an_lr_jump_is_a_discontinuity_but_warmup_and_cosine_decay_are_not():
    steps = healthy_steps(warmup=50)
    assert lr_discontinuities(steps) == []
    steps.loc[steps["step"] >= T, "lr"] *= 3
    jumps = lr_discontinuities(steps)
    assert [(j["step"], j["direction"]) for j in jumps] == [(T, "up")]
    assert jumps[0]["factor"] == pytest.approx(3.0, rel=0.01)  # x3 on top of one step of cosine decay


@pytest.mark.parametrize("at, factor", [(120, 10.0), (333, 4.0)])
def test_an_lr_raised_for_one_step_is_a_discontinuity_up_and_back(at, factor):
    # The change up and the change back sit side by side, each as large as the other: neither is
    # the schedule's pace the other is judged against.
    steps = healthy_steps(warmup=50)
    steps.loc[steps["step"] == at, "lr"] *= factor
    assert [(j["step"], j["direction"]) for j in lr_discontinuities(steps)] == [(at, "up"), (at + 1, "down")]


def test_an_lr_raised_for_two_steps_on_a_decay_is_still_one_jump_up_and_one_back():
    # The decay's own small step down between the two raised steps is no return of the jump.
    steps = healthy_steps(warmup=50)
    steps.loc[steps["step"].isin([200, 201]), "lr"] *= 6
    assert [(j["step"], j["direction"]) for j in lr_discontinuities(steps)] == [(200, "up"), (202, "down")]


def test_a_triangular_cyclic_schedule_turning_has_no_discontinuity():
    lr = np.concatenate([np.linspace(1e-4, 1e-3, 50), np.linspace(1e-3, 1e-4, 50)] * 3)
    assert lr_discontinuities(pd.DataFrame({"step": range(lr.size), "lr": lr})) == []


def test_a_step_schedule_drop_is_a_downward_discontinuity():
    steps = pd.DataFrame({"step": range(300), "lr": [1e-3] * 100 + [1e-4] * 100 + [1e-5] * 100})
    assert [(j["step"], j["direction"]) for j in lr_discontinuities(steps)] == [(100, "down"), (200, "down")]


def test_each_param_group_lr_is_checked():
    steps = pd.DataFrame({"step": range(100), "lr": 1e-3, "lr_1": [1e-3] * 60 + [5e-3] * 40})
    assert [(j["step"], j["group"]) for j in lr_discontinuities(steps)] == [(60, 1)]


def test_lr_at_reads_the_last_logged_lr_at_or_before_a_step():
    steps = pd.DataFrame({"step": [0, 10, 20], "lr": [1.0, 2.0, 3.0]})
    assert lr_at(steps, 15) == 2.0 and math.isnan(lr_at(steps.drop(columns="lr"), 15))


def test_warmup_is_visible_and_ends_where_the_lr_reaches_its_peak():
    w = warmup(healthy_steps(warmup=50))
    assert w["visible"] and w["end_step"] == 49 and w["first_step"] == 0


def test_no_warmup_when_the_first_lr_is_already_at_its_peak():
    assert warmup(healthy_steps(warmup=0))["visible"] is False


def test_warmup_is_unknown_for_a_log_that_starts_mid_run():
    assert warmup(healthy_steps(start=5000)) is None


def test_clipping_saturation_before_onset_against_the_rest_of_the_run():
    steps = healthy_steps()
    steps.loc[T - 80 : T - 1, "clip_coef"] = 0.4
    clip = clipping_before(steps, T)
    assert clip["saturated"] and clip["share"] == 0.8 and clip["median_coef"] == 0.4 and clip["run_share"] == 0.0


def test_the_clip_of_the_onset_step_itself_is_told():
    steps = healthy_steps()
    steps["clip_coef"] = 1.0
    steps.loc[T, "clip_coef"] = 1 / 43
    assert clipping_before(steps, T)["at_onset"] == pytest.approx(1 / 43)
    assert clipping_before(steps, T + 1)["at_onset"] is None  # a step the clip left alone


def test_clipping_on_every_step_is_not_saturation_before_an_incident():
    steps = healthy_steps()
    steps["clip_coef"] = 0.5
    clip = clipping_before(steps, T)
    assert clip["share"] == 1.0 and not clip["saturated"]


def test_loss_scale_halvings_around_onset_are_notable_beyond_routine_backoff():
    steps = healthy_steps()
    steps["loss_scale"] = 65536.0
    steps["skipped"] = False
    steps.loc[T:T + 3, "loss_scale"] = [32768.0, 16384.0, 8192.0, 4096.0]
    steps.loc[T + 4 :, "loss_scale"] = 4096.0
    steps.loc[T:T + 3, "skipped"] = True
    drops = loss_scale_drops(steps, T - 100, T + 20)
    assert (drops["from"], drops["to"], drops["halvings"], drops["skipped"], drops["notable"]) == (65536.0, 4096.0, 4.0, 4, True)
    steps.loc[T + 1 :, "loss_scale"] = 32768.0
    assert loss_scale_drops(steps, T - 100, T + 20)["notable"] is False


def _ranks(n_ranks: int = 4) -> pd.DataFrame:
    frames = []
    for rank in range(n_ranks):
        frame = healthy_steps(seed=rank)[["step", "loss"]]
        frames.append(frame.assign(rank=rank))
    return pd.concat(frames, ignore_index=True)


def test_one_rank_alone_non_finite_is_rank_divergence():
    rows = _ranks()
    rows.loc[(rows["rank"] == 2) & (rows["step"] == T), "loss"] = np.nan
    found = rank_divergence(rows, T, T)
    assert found["off_ranks"] == [2] and found["alone"]
    assert found["sentences"] == ["rank 2's loss went non-finite at step 400 while every other rank's stayed finite"]


def test_one_rank_alone_far_above_the_others_is_rank_divergence():
    rows = _ranks()
    rows.loc[(rows["rank"] == 1) & (rows["step"] == T), "loss"] += 3.0
    found = rank_divergence(rows, T, T)
    assert found["off_ranks"] == [1] and found["alone"]


def test_all_ranks_moving_together_is_not_rank_divergence():
    rows = _ranks()
    rows.loc[rows["step"] == T, "loss"] += 3.0
    found = rank_divergence(rows, T, T)
    assert found["off_ranks"] == [] and not found["alone"]


def test_a_single_rank_run_has_no_rank_context():
    assert rank_divergence(_ranks(1), T, T) is None


def test_update_per_unit_lr_off_while_the_gradient_is_not_points_at_the_optimizer():
    steps = healthy_steps()
    steps.loc[T, "update_norm"] *= 20
    assert update_without_grad(steps, T, T)["fired"]
    steps.loc[T, "grad_norm"] *= 20
    assert not update_without_grad(steps, T, T)["fired"]


def test_an_lr_change_alone_does_not_look_like_an_optimizer_state_problem():
    steps = healthy_steps()
    steps.loc[T:, ["lr", "update_norm"]] *= 10
    assert not update_without_grad(steps, T, T)["fired"]


def test_an_update_that_departs_the_step_before_onset_with_a_quiet_gradient_points_at_the_optimizer():
    steps = healthy_steps()
    steps.loc[T - 1, "update_norm"] *= 20
    steps.loc[T, "grad_norm"] *= 20  # the loss flag's own step: the state's damage shows in the gradient
    assert not update_without_grad(steps, T, T)["fired"]
    found = update_without_grad(steps, T, T, before=2)
    assert found["fired"] and found["step"] == T - 1


def test_a_gradient_that_jumped_first_explains_the_update_that_followed():
    steps = healthy_steps()
    steps.loc[T - 1, "grad_norm"] *= 20
    steps.loc[T, "update_norm"] *= 20
    assert not update_without_grad(steps, T, T, before=2)["fired"]
