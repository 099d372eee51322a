"""Specification of the cause rules and the recommendation, each on a real run dir with one planted pattern."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spikedoc.report.terminal import action_text

from spikedoc.analysis import analyze
from spikedoc.analysis.causes import Evidence, decide_cause, tighter_clip
from spikedoc.analysis.incident import CAUSES, Incident
from tests.common.planted import adamw_meta, healthy_layers, healthy_steps, write_run

T = 400  # step at which each fault is planted


def _only(diagnosis, kind=None):
    incidents = [i for i in diagnosis.incidents if kind is None or i.kind == kind]
    assert len(incidents) == 1, [(i.kind, i.onset_step, i.cause) for i in diagnosis.incidents]
    return incidents[0]


def _elevate(steps: pd.DataFrame, start: int, stop: int, factor: float) -> None:
    rows = (steps["step"] >= start) & (steps["step"] < stop)
    steps.loc[rows, "loss"] *= factor


# ----------------------------------------------------------------------------------- bad_batch


def test_bad_batch_when_the_onset_batch_is_near_constant_tokens(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    steps.loc[T, "distinct_token_ratio"] = 0.02
    steps.loc[T, "grad_norm"] *= 6
    _elevate(steps, T, T + 20, 1.6)
    inc = _only(analyze(write_run(tmp_path / "run", steps, layers)))
    assert (inc.onset_step, inc.cause) == (T, "bad_batch")
    assert any("distinct-token ratio 0.02: near-constant input" in e for e in inc.evidence)
    assert inc.recommendation["skip_steps"] == [T]
    assert inc.recommendation["skip_sample_ids"] == [f"doc-{T * 8 + i}" for i in range(8)]


def test_a_stretch_of_high_entropy_batches_is_skipped_whole(tmp_path):
    steps = healthy_steps()
    stretch = steps["step"].between(T, T + 29)
    steps.loc[stretch, "distinct_token_ratio"] = 0.95  # random bytes where text held ~0.6
    _elevate(steps, T, T + 30, 1.5)
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.onset_step, inc.cause) == (T, "bad_batch")
    assert any("high-entropy input" in e for e in inc.evidence)
    assert any(f"29 more batches after onset (steps {T + 1}..{T + 29})" in e for e in inc.evidence)
    assert inc.recommendation["skip_steps"] == list(range(T, T + 30))
    assert inc.recommendation["skip_sample_ids"] == [f"doc-{T * 8 + i}" for i in range(30 * 8)]


@pytest.mark.parametrize("seed", [9, 11])
def test_one_corrupt_stretch_whose_loss_dips_back_into_the_band_is_one_incident(tmp_path, seed):
    steps = healthy_steps(seed=seed)
    stretch = steps["step"].between(T + 31, T + 52)
    steps.loc[stretch, "distinct_token_ratio"] = 0.95
    lifts = np.full(22, 1.9)
    lifts[[6, 7, 8, 9, 10]] = 1.0  # five batches of the stretch happen to be as easy as text: the loss is back in its band
    steps.loc[stretch, "loss"] *= lifts
    [inc] = analyze(write_run(tmp_path / "run", steps)).incidents
    assert inc.cause == "bad_batch" and inc.onset_step == T + 31
    assert inc.recommendation["skip_steps"] == list(range(T + 31, T + 53))


def test_batches_after_onset_without_the_onset_batch_anomaly_are_not_skipped(tmp_path):
    steps = healthy_steps()
    steps.loc[T, "distinct_token_ratio"] = 0.95
    steps.loc[T + 5, "seq_len_median"] = 400.0  # another kind of oddity later in the incident
    _elevate(steps, T, T + 30, 1.5)
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.recommendation["skip_steps"] == [T]


def test_bad_batch_names_overlong_sequences_as_a_ratio_to_the_run_median(tmp_path):
    steps = healthy_steps()
    steps.loc[T, ["seq_len_median", "seq_len_max"]] = [310.0, 512.0]
    steps.loc[T, "grad_norm"] *= 10
    _elevate(steps, T + 1, T + 30, 1.5)
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.cause == "bad_batch"
    assert any("median sequence length 310 is 3.1x the run's median" in e for e in inc.evidence)
    assert inc.batches[-1]["step"] == T and "high_seq_len_median" in inc.batches[-1]["flags"]


def test_a_one_step_loss_spike_without_precursor_is_the_batch_itself(tmp_path):
    # No fingerprint says anything, but the loss (measured before the update) is back at the next step.
    steps = healthy_steps()
    steps.loc[T, "loss"] *= 2.0
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.cause, inc.recovered, inc.recovery_step, inc.severity) == ("bad_batch", True, T + 1, "moderate")
    assert "back in the band at the next step" in inc.evidence[0]
    assert inc.recommendation["rollback"] is False


def test_a_minor_blip_without_evidence_gets_no_cause_and_nothing_to_skip(tmp_path):
    steps = healthy_steps(seed=3)
    steps.loc[T + 17, "loss"] *= 1.3
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.severity, inc.cause) == ("minor", "unknown")
    assert inc.recommendation["skip_steps"] == [] and inc.recommendation["skip_sample_positions"] == []
    assert [a["action"] for a in inc.recommendation["actions"]] == ["none"]


def test_a_single_nonfinite_loss_that_does_not_persist_is_the_batch_itself(tmp_path):
    steps = healthy_steps()
    steps.loc[T, ["loss", "grad_norm", "skipped"]] = [np.inf, np.inf, True]  # GradScaler skipped the step
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.kind, inc.cause) == ("nonfinite", "bad_batch")
    assert inc.evidence[0].startswith(f"the loss was non-finite at step {T} only and finite again at the next step")


def test_bad_batch_skips_only_the_outlier_samples_when_sample_losses_single_them_out(tmp_path):
    steps = healthy_steps()
    losses = list(steps.loc[T, "sample_losses"])
    losses[3] = 14.0
    steps.at[T, "sample_losses"] = losses
    steps.loc[T, "loss"] = float(np.mean(losses))
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.cause == "bad_batch"
    assert inc.recommendation["skip_sample_ids"] == [f"doc-{T * 8 + 3}"]
    assert inc.batches[-1]["worst_samples"][0] == {"id": f"doc-{T * 8 + 3}", "loss": pytest.approx(14.0)}


# ------------------------------------------------------------------------------ grad_explosion


def test_grad_explosion_when_the_gradient_grows_before_the_loss(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    growth = 1.6 ** np.arange(1, 11)  # steps T-9 .. T: the gradient norm climbs ~100x
    steps.loc[T - 9 : T, "grad_norm"] *= growth
    steps["clip_coef"] = np.minimum(1.0, 1.0 / steps["grad_norm"])
    fc = (layers["name"] == "h.0.mlp.fc.weight") & layers["step"].between(T - 12, T)
    layers.loc[fc, "grad_norm"] *= 1.6 ** np.arange(1, 14)  # this tensor starts three steps earlier
    _elevate(steps, T, T + 40, 1.8)
    inc = _only(analyze(write_run(tmp_path / "run", steps, layers)))
    assert inc.cause == "grad_explosion"
    assert inc.metric == "grad_norm" and inc.series["loss"]["onset_step"] == T
    assert inc.layers[0]["name"] == "h.0.mlp.fc.weight" and inc.layers[0]["module"] == "mlp"
    assert inc.precursor_lead_steps == inc.layers[0]["lead_steps"] > inc.series["loss"]["onset_step"] - inc.onset_step
    assert any("gradient norm was flagged at step" in e for e in inc.evidence)


# ----------------------------------------------------------------------------- optimizer_state


def test_optimizer_state_when_the_eps_fraction_rises_and_the_second_moment_collapses(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    qkv = layers["name"] == "h.0.attn.qkv.weight"
    ramp = qkv & layers["step"].between(T - 40, T + 5)
    layers.loc[ramp, "eps_frac"] = np.linspace(0.01, 0.4, int(ramp.sum()))
    # As fast as Adam can shrink it (beta2 0.9 per step, the gradient gone): a collapse no update forbids
    # (from its level at the ramp's start: the healthy series' own shrinking on top of it would be faster).
    start = layers.loc[ramp, "exp_avg_sq_mean"].iloc[0]
    layers.loc[ramp, "exp_avg_sq_mean"] = start * 0.905 ** np.arange(int(ramp.sum()))
    layers.loc[qkv & layers["step"].between(T, T + 5), "update_ratio"] *= 30
    _elevate(steps, T, T + 20, 1.4)
    inc = _only(analyze(write_run(tmp_path / "run", steps, layers)))
    assert inc.cause == "optimizer_state"
    assert any("eps-dominated fraction of h.0.attn.qkv.weight rose" in e for e in inc.evidence)
    assert inc.recommendation["reset_optimizer_state_for"] == ["h.0.attn.qkv.weight"]
    assert inc.precursor_lead_steps is not None and inc.precursor_lead_steps >= 20


# ------------------------------------------------------------------------------- numerics_rank


def test_numerics_rank_when_one_rank_alone_goes_nonfinite(tmp_path):
    meta = adamw_meta(world_size=2)
    rank0, rank1 = healthy_steps(seed=0), healthy_steps(seed=1)
    rank1.loc[T, "loss"] = np.nan
    for frame in (rank0, rank1):  # the NaN reaches every rank through the all-reduce; the scaler skips
        frame.loc[T, ["grad_norm", "skipped"]] = [np.inf, True]
    write_run(tmp_path / "run", rank0, meta=meta, rank=0, segment=0)
    write_run(tmp_path / "run", rank1, meta=meta, rank=1, segment=0)
    inc = _only(analyze(tmp_path / "run"))
    assert (inc.kind, inc.onset_step, inc.cause) == ("nonfinite", T, "numerics_rank")
    assert any("rank 1's loss went non-finite at step 400 while every other rank's stayed finite" in e for e in inc.evidence)
    assert inc.recommendation["lr_factor"] is None  # numerics: nothing says the LR is wrong


def test_numerics_when_the_run_goes_nonfinite_with_no_build_up(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    steps.loc[T:, ["loss", "grad_norm"]] = np.nan  # one weight became inf before step T's forward
    after = layers["step"] >= T
    layers.loc[after, ["grad_norm", "update_ratio"]] = np.nan
    layers.loc[after, "nonfinite"] = 16
    layers.loc[after & (layers["name"] == "h.0.mlp.fc.weight"), "param_norm"] = np.inf
    inc = _only(analyze(write_run(tmp_path / "run", steps, layers)))
    assert (inc.kind, inc.onset_step, inc.cause) == ("nonfinite", T, "numerics_rank")
    assert "with no build-up" in inc.evidence[0]
    assert inc.evidence[1] == f"the parameters of h.0.mlp.fc.weight became non-finite at step {T}"


def test_numerics_when_a_weight_goes_nonfinite_in_an_update_whose_gradients_were_finite(tmp_path):
    # The weight broke in step T-1's update (a corrupted value, an overflow in the optimizer): its
    # parameter norm is non-finite one step before the loss, while every gradient was still finite.
    steps = healthy_steps()
    layers = healthy_layers(steps)
    steps.loc[T:, ["loss", "grad_norm"]] = np.nan
    after = layers["step"] >= T
    layers.loc[after, ["grad_norm", "update_ratio"]] = np.nan
    layers.loc[after, "nonfinite"] = 16
    broken = (layers["step"] >= T - 1) & (layers["name"] == "h.0.mlp.fc.weight")
    layers.loc[broken, ["param_norm", "update_ratio"]] = [np.inf, np.nan]
    inc = _only(analyze(write_run(tmp_path / "run", steps, layers)))
    assert (inc.kind, inc.onset_step, inc.cause) == ("nonfinite", T, "numerics_rank")
    assert f"the parameters of h.0.mlp.fc.weight became non-finite at step {T - 1}" in inc.evidence


def test_a_nonfinite_loss_after_the_gradient_grew_is_an_explosion(tmp_path):
    steps = healthy_steps()
    steps.loc[T - 6 : T - 1, "grad_norm"] *= 2.0 ** np.arange(1, 7)
    steps.loc[T:, ["loss", "grad_norm"]] = np.nan
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    assert [i.kind for i in diagnosis.incidents] == ["grad_spike", "nonfinite"]  # growth, then NaN
    inc = _only(diagnosis, "nonfinite")
    assert inc.cause == "grad_explosion" and inc.precursor_lead_steps >= 4
    assert inc.evidence[-1] == "a non-finite loss late in training follows exploding gradients (troubleshooting table)"



def test_a_one_step_gradient_outlier_right_before_a_nan_is_no_explosion(tmp_path):
    # The gradient norm was 4x its baseline at step T-1 only; at T a weight went inf and every value after
    # is NaN, so nothing says the gradient stayed up: neither incident is an explosion.
    steps = healthy_steps()
    steps.loc[T - 1, "grad_norm"] *= 4.0
    steps.loc[T:, ["loss", "grad_norm"]] = np.nan
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    assert [i.kind for i in diagnosis.incidents] == ["grad_spike", "nonfinite"]
    outlier, nan = diagnosis.incidents
    assert outlier.cause != "grad_explosion" and nan.cause == "numerics_rank"
    assert "lower_lr" not in {a["action"] for a in outlier.recommendation["actions"]}
    assert not {"lower_lr", "tighten_clip"} & {a["action"] for a in nan.recommendation["actions"]}

# ---------------------------------------------------------------------------------- lr_schedule


def test_lr_schedule_when_the_lr_jumps_where_a_resumed_segment_starts(tmp_path):
    steps = healthy_steps()
    steps.loc[steps["step"] >= 300, "lr"] *= 4  # the scheduler restarted at a higher phase
    _elevate(steps, 305, 360, 1.6)
    first, second = steps.iloc[:300], steps.iloc[300:]
    write_run(tmp_path / "run", first)
    write_run(tmp_path / "run", second)
    diagnosis = analyze(tmp_path / "run")
    inc = _only(diagnosis)
    assert inc.cause == "lr_schedule" and diagnosis.context[0]["segment"] == 1
    assert any("jumped from" in e and "(4x) at step 300" in e for e in inc.evidence)
    assert any("segment 1 resumed the run" in e for e in inc.evidence)
    assert inc.recommendation["lr_factor"] == 1.0
    assert "lr_discontinuity" in [f.id for f in diagnosis.findings]


def test_one_lr_jump_of_every_param_group_is_one_discontinuity(tmp_path):
    steps = healthy_steps(seed=11)
    steps["lr_1"] = steps["lr"] * 0.1  # a second param group on the same schedule
    jump = steps["step"] >= T + 7
    steps.loc[jump, ["lr", "lr_1"]] *= 10
    diagnosis = analyze(write_run(tmp_path / "run", steps))
    [finding] = [f for f in diagnosis.findings if f.id == "lr_discontinuity"]
    assert [(j["step"], j["groups"]) for j in finding.details["jumps"]] == [(T + 7, [0, 1])]
    assert "jumps at 1 step" in finding.message


def test_the_guards_own_lr_cut_and_its_undo_are_neither_findings_nor_causes(tmp_path):
    steps = healthy_steps(seed=13)
    cut = steps["step"].between(T + 3, T + 40)  # rolled back to T+3 with the LR halved, undone at T+41
    steps.loc[cut, "lr"] *= 0.5
    events = [("rollback", T + 3, {"from_step": T + 9, "to_step": T + 3, "lr_scale": 0.5}),
              ("data_skip", T + 41, {"remedy_reverted": True})]
    diagnosis = analyze(write_run(tmp_path / "run", steps, events=events))
    assert "lr_discontinuity" not in [f.id for f in diagnosis.findings]
    assert all(i.cause != "lr_schedule" for i in diagnosis.incidents)


# ---------------------------------------------------------------------------------- lr_too_high


def test_lr_too_high_for_an_instability_right_after_warmup(tmp_path):
    steps = healthy_steps(warmup=50)
    _elevate(steps, 80, 600, 2.5)  # early, the loss falls fast and the band is wide; it never comes back
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.onset_step, inc.cause, inc.verdict) == (80, "lr_too_high", "persistent")
    assert "31 steps after the warmup ended (step 49)" in inc.evidence[0]
    assert inc.recommendation["lr_factor"] == pytest.approx(0.7)


def test_a_recovered_early_instability_gets_no_lr_advice(tmp_path):
    steps = healthy_steps(warmup=50)
    _elevate(steps, 80, 95, 2.5)
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert (inc.cause, inc.verdict, inc.recommendation["rollback"]) == ("lr_too_high", "recovered", False)
    assert inc.recommendation["lr_factor"] is None and inc.recommendation["clip_max_norm"] is None


def test_lr_too_high_for_an_early_instability_without_warmup(tmp_path):
    steps = healthy_steps(warmup=0)
    _elevate(steps, 120, 135, 2.5)
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.cause == "lr_too_high"
    assert inc.evidence[0].startswith("no warmup: the LR started at")


# ---------------------------------------------------------------------------------- state_reset


def test_state_reset_when_the_loss_returns_to_its_initial_level_after_a_resume(tmp_path):
    steps = healthy_steps()
    fresh = healthy_steps(seed=5).iloc[: len(steps) - 300].copy()
    fresh["step"] += 300  # the resumed segment continues the step count but relearns from scratch
    fresh["time"] += 1e4
    write_run(tmp_path / "run", steps.iloc[:300])
    write_run(tmp_path / "run", fresh)
    diagnosis = analyze(tmp_path / "run")
    inc = diagnosis.incidents[0]
    assert (inc.onset_step, inc.cause) == (300, "state_reset")
    assert "of the way back to its initial" in inc.evidence[0]
    assert inc.recommendation["rollback"] is True


def test_a_state_reset_at_a_resume_rolls_back_to_the_checkpoint_the_resume_should_have_loaded(tmp_path):
    steps = healthy_steps()
    fresh = healthy_steps(seed=5).iloc[: len(steps) - 300].copy()
    fresh["step"] += 300
    fresh["time"] += 1e4
    events = [("checkpoint", s, {"path": f"ckpt/{s}.pt"}) for s in (250, 300)]
    write_run(tmp_path / "run", steps.iloc[:300], events=events)
    write_run(tmp_path / "run", fresh)
    inc = analyze(tmp_path / "run").incidents[0]
    assert inc.cause == "state_reset" and inc.recommendation["rollback_to_step"] == 300


# -------------------------------------------------------------------------------------- unknown


def test_unknown_when_nothing_in_the_checklist_matches(tmp_path):
    steps = healthy_steps()
    _elevate(steps, T, T + 15, 1.3)
    inc = _only(analyze(write_run(tmp_path / "run", steps, healthy_layers(steps))))
    assert inc.cause == "unknown"
    assert inc.evidence[0] == (
        "nothing in the checklist matched: no anomalous batch statistic at onset; no LR discontinuity before it; "
        "no gradient-norm flag ahead of the loss; no tensor departing from its history ahead of the loss"
    )


def test_unknown_says_what_the_data_did_not_allow_to_check(tmp_path):
    steps = healthy_steps()
    _elevate(steps, T, T + 15, 1.3)
    path = tmp_path / "log.csv"
    steps[["step", "loss"]].to_csv(path, index=False)
    inc = _only(analyze(path))
    assert inc.cause == "unknown"
    assert inc.evidence[:2] == [
        "nothing in the checklist matched: no evidence was available",
        "could not check batch statistics (no fingerprints), the LR (not logged), the gradient norm (not logged), "
        "per-tensor history (no layer table)",
    ]


def test_every_decided_cause_is_one_of_the_documented_causes():
    inc = Incident(kind="loss_spike", metric="loss", onset_step=10, peak_step=10, end_step=12, magnitude_sigma=9.0,
                   peak_ratio=1.5, baseline=2.0, peak_value=3.0, recovered=False)
    assert decide_cause(inc, Evidence())[0] in CAUSES


# ------------------------------------------------------------------------------- recommendation


def test_rollback_goes_to_the_last_checkpoint_before_the_earliest_precursor(tmp_path):
    steps = healthy_steps()
    steps.loc[T - 8 : T, "grad_norm"] *= 1.8 ** np.arange(1, 10)  # flagged from about T-7
    _elevate(steps, T, 600, 2.0)
    events = [("checkpoint", s, {"path": f"ckpt/{s}.pt"}) for s in (300, 390, 398, 500)]
    inc = _only(analyze(write_run(tmp_path / "run", steps, events=events)))
    assert inc.series["loss"]["onset_step"] == T and inc.onset_step <= T - 5
    # 398 is before the loss moved but after the gradient started to grow: its state is already suspect.
    rec = inc.recommendation
    assert (rec["rollback_to_step"], rec["checkpoint_path"], rec["checkpoint_known"]) == (390, "ckpt/390.pt", True)
    assert action_text(rec["actions"][0]) == "roll back to ckpt/390.pt (the state before step 390)"


def test_rollback_without_checkpoint_events_is_the_newest_healthy_state(tmp_path):
    steps = healthy_steps()
    _elevate(steps, T, 600, 2.0)  # never comes back: a rollback is needed
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.recovered is False
    # The state before step T - 1, whose update the onset's loss is the first to show.
    assert (inc.recommendation["rollback_to_step"], inc.recommendation["checkpoint_known"]) == (T - 1, False)
    assert "no checkpoint events recorded" in action_text(inc.recommendation["actions"][0])


def test_a_checkpoint_file_written_again_after_onset_is_no_rollback_target(tmp_path):
    steps = healthy_steps(seed=5)
    _elevate(steps, T + 13, 600, 2.0)
    events = [("checkpoint", s, {"path": "out/ckpt.pt"}) for s in (T - 87, T + 13 - 30, T + 100)]
    events.insert(1, ("checkpoint", T - 50, {"path": "out/keep.pt"}))
    inc = _only(analyze(write_run(tmp_path / "run", steps, events=events)))
    rec = inc.recommendation
    assert (rec["rollback_to_step"], rec["checkpoint_path"]) == (T - 50, "out/keep.pt")
    assert rec["checkpoints_overwritten"] == [{"path": "out/ckpt.pt", "overwritten_at": T + 100}]


def test_when_every_clean_checkpoint_was_overwritten_the_advice_says_none_holds_the_state(tmp_path):
    steps = healthy_steps(seed=7)
    _elevate(steps, T + 21, 600, 2.0)
    events = [("checkpoint", s, {"path": "out/ckpt.pt"}) for s in (T - 79, T + 21 - 40, T + 71, T + 121)]
    inc = _only(analyze(write_run(tmp_path / "run", steps, events=events)))
    rec = inc.recommendation
    assert (rec["checkpoint_known"], rec["checkpoint_path"], rec["rollback_to_step"]) == (False, None, T + 20)
    assert action_text(rec["actions"][0]).startswith(
        f"out/ckpt.pt was overwritten at step {T + 71}; no recorded checkpoint holds a state before step {T + 20}")


def test_a_recovered_incident_names_no_rollback_target(tmp_path):
    steps = healthy_steps(seed=9)
    steps.loc[T + 3, "loss"] *= 2.2
    inc = _only(analyze(write_run(tmp_path / "run", steps, events=[("checkpoint", T - 3, {"path": "c.pt"})])))
    rec = inc.recommendation
    assert rec["rollback"] is False
    assert (rec["rollback_to_step"], rec["checkpoint_path"]) == (None, None)


def test_a_checkpoint_taken_at_the_onset_step_is_not_a_rollback_target_unless_the_onset_batch_is_the_fault(tmp_path):
    # The checkpoint event at step T holds the update of step T - 1, which the loss at T is the first to show.
    steps = healthy_steps()
    _elevate(steps, T, 600, 2.0)
    events = [("checkpoint", s, {"path": f"ckpt/{s}.pt"}) for s in (T - 50, T)]
    inc = _only(analyze(write_run(tmp_path / "run", steps, events=events)))
    assert inc.cause not in ("bad_batch", "lr_schedule") and inc.recommendation["rollback_to_step"] == T - 50


@pytest.mark.parametrize(("current", "expected"), [(None, 1.0), (5.0, 1.0), (2.0, 1.0), (1.0, 0.5), (0.5, 0.25)])
def test_clipping_tightens_to_one_then_halves(current, expected):
    assert tighter_clip(current) == expected


def _clipped_at(max_norm: float) -> pd.DataFrame:
    """A healthy run (gradient norms 1.8-2.3) clipped at `max_norm` by the loop, then a gradient spike with lasting damage."""
    steps = healthy_steps()
    steps["grad_norm"] *= 4
    steps["clip_coef"] = np.minimum(1.0, max_norm / steps["grad_norm"])
    steps.loc[T - 3 : T + 2, "grad_norm"] *= 50  # the gradient spiked with it: clipping is implicated
    _elevate(steps, T, 600, 1.3)
    return steps


def test_clip_norm_in_use_is_inferred_from_clip_coef_without_meta_config(tmp_path):
    steps = _clipped_at(2.1)  # about a third of the steps clipped
    meta = adamw_meta(watch={"every": 1, "layer_every": 1, "clip": None})
    inc = analyze(write_run(tmp_path / "run", steps, meta=meta)).incidents[0]
    assert inc.recommendation["clip_max_norm"] == 1.0  # 2.1 observed -> 1.0


def test_a_clip_that_already_acts_on_most_steps_is_not_tightened_and_the_report_says_why(tmp_path):
    steps = _clipped_at(1.5)  # nearly every step clipped: tightening would cut every update
    meta = adamw_meta(watch={"every": 1, "layer_every": 1, "clip": None})
    diagnosis = analyze(write_run(tmp_path / "run", steps, meta=meta))
    inc, ctx = diagnosis.incidents[0], diagnosis.context[0]
    assert inc.recommendation["rollback"] and inc.recommendation["clip_max_norm"] is None
    assert "tighten_clip" not in [a["action"] for a in inc.recommendation["actions"]]
    assert any(n.startswith("no tighter clipping advised: clipping at 1.5 already acts on 100%") for n in ctx["notes"])


def test_recommended_lr_factor_and_new_peak_lr_follow_the_case_study(tmp_path):
    steps = healthy_steps(lr=3e-4)
    steps.loc[T - 3 : T + 2, "grad_norm"] *= 50
    _elevate(steps, T, 600, 1.3)
    rec = analyze(write_run(tmp_path / "run", steps)).incidents[0].recommendation
    assert rec["lr_factor"] == pytest.approx(0.7)
    assert rec["new_peak_lr"] == pytest.approx(0.7 * 3e-4, rel=1e-5)
    assert math.isclose(rec["clip_max_norm"], 0.5)  # meta clip 1.0 -> halved


def test_two_gradient_outliers_in_one_episode_that_each_came_back_are_no_explosion(tmp_path):
    steps = healthy_steps()
    steps.loc[T, "grad_norm"] *= 20
    steps.loc[T + 4, "grad_norm"] *= 60  # back in the band in between; the loss never leaves its band
    steps.loc[steps["step"] > T, "loss"] *= 1.10  # but settles 10% higher: not a minor incident
    inc = _only(analyze(write_run(tmp_path / "run", steps)))
    assert inc.metric == "grad_norm" and inc.series["grad_norm"]["recovered"] and inc.severity != "minor"
    assert inc.cause != "grad_explosion", inc.evidence


def test_a_rollback_never_stops_after_an_earlier_incident_the_run_did_not_recover_from(tmp_path):
    steps = healthy_steps()
    for at in (T, T + 80):  # two spikes, each leaving the loss 10% higher
        _elevate(steps, at, at + 5, 2.0)
        _elevate(steps, at + 5, 600, 1.1)
    steps.loc[T + 80, "distinct_token_ratio"] = 0.02  # the second one on a bad batch
    first, later = analyze(write_run(tmp_path / "run", steps)).incidents
    assert (first.onset_step, later.onset_step, later.cause) == (T, T + 80, "bad_batch")
    assert first.recommendation["rollback"] and later.recommendation["rollback"]
    assert later.recommendation["rollback_to_step"] == first.recommendation["rollback_to_step"] < T
    rollback = next(a for a in later.recommendation["actions"] if a["action"] == "rollback")
    assert f"had not recovered from the incident at step {T}" in rollback["because"]
