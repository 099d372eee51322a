"""Specification of lineages: resumed and restarted segments analysed as the trajectory they continue."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spikedoc.analysis import analyze
from spikedoc.analysis.lineage import Lineage, check_resume, moments_ratio
from tests.common.planted import healthy_layers, healthy_steps, write_run


def _segments(*ranges: tuple[int, int], loss=None) -> pd.DataFrame:
    frames = []
    for segment, (start, stop) in enumerate(ranges):
        step = np.arange(start, stop)
        frames.append(pd.DataFrame({"step": step, "segment": segment, "time": 1e4 * segment + step,
                                    "loss": 5.0 * np.exp(-step / 100) + 1.0 if loss is None else loss(segment, step)}))
    return pd.concat(frames, ignore_index=True)


def test_a_single_segment_is_one_piece_that_resumes_nothing():
    lineage = Lineage(_segments((0, 50)))
    assert len(lineage.pieces) == 1 and not lineage.pieces[0].resumed
    assert lineage.final()["step"].tolist() == list(range(50))


def test_a_resumed_segment_continues_from_the_ancestor_rows_before_its_first_step():
    lineage = Lineage(_segments((0, 100), (80, 150)))
    frame = lineage.frame(1)
    assert frame["step"].tolist() == list(range(150))
    assert frame.loc[frame["step"] < 80, "segment"].eq(0).all() and frame.loc[frame["step"] >= 80, "segment"].eq(1).all()
    assert lineage.pieces[1].resumed
    assert lineage.abandoned_steps() == [{"segment": 0, "first_step": 80, "last_step": 99}]


def test_a_chain_of_resumes_takes_each_ancestor_only_up_to_where_the_next_one_resumed():
    lineage = Lineage(_segments((0, 100), (60, 90), (70, 120)))
    frame = lineage.frame(2)
    assert frame.groupby("segment")["step"].agg(["min", "max"]).values.tolist() == [[0, 59], [60, 69], [70, 119]]


def test_a_segment_restarting_at_step_zero_is_a_new_lineage():
    lineage = Lineage(_segments((0, 100), (0, 40)))
    assert not lineage.pieces[1].resumed
    assert lineage.frame(1)["segment"].eq(1).all()


def test_steps_going_backwards_inside_one_segment_start_a_new_piece():
    steps = pd.DataFrame({"step": [0, 1, 2, 3, 1, 2, 3, 4], "segment": 0, "time": np.arange(8.0), "loss": 1.0})
    lineage = Lineage(steps)
    assert [(p.first_step, p.last_step) for p in lineage.pieces] == [(0, 3), (1, 4)]
    assert lineage.frame(1)["step"].tolist() == [0, 1, 2, 3, 4]


def test_a_step_logged_twice_without_wall_time_is_one_row_not_a_restart():
    steps = pd.DataFrame({"step": [0, 1, 2, 2, 3, 4], "segment": 0, "loss": [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]})
    lineage = Lineage(steps)
    assert len(lineage.pieces) == 1
    assert lineage.final()["loss"].tolist() == [3.0, 2.9, 2.7, 2.6, 2.5]


def test_resume_check_flags_a_loss_that_returns_most_of_the_way_to_its_initial_level():
    # Segment 1 resumes at step 200 but relearns from scratch: its loss starts near the initial 6.0.
    lineage = Lineage(_segments((0, 200), (200, 260), loss=lambda seg, step: 5.0 * np.exp(-(step - 200 * seg) / 50) + 1.0))
    resume = check_resume(lineage, 1)
    assert resume.state_reset and resume.back_fraction > 0.9
    assert resume.loss_before < 1.1 and resume.loss_after > 5.0
    assert "the model state was not restored" in resume.evidence[0]


def test_resume_check_passes_a_resume_that_continues_the_curve():
    lineage = Lineage(_segments((0, 200), (200, 260)))
    resume = check_resume(lineage, 1)
    assert not resume.state_reset and abs(resume.back_fraction) < 0.05


def test_resume_check_passes_a_resume_whose_first_loss_is_trained_however_far_the_next_ones_go_back():
    # The state was loaded (the resume's first loss, taken before its update, is on the curve); its
    # first updates threw the loss back most of the way to the start: a step size, not a state never loaded.
    def loss(segment, step):
        curve = 5.0 * np.exp(-step / 100) + 1.0
        return np.where((segment == 1) & (step > 200), 5.5, curve)

    resume = check_resume(Lineage(_segments((0, 200), (200, 260), loss=loss)), 1)
    assert resume.back_fraction > 0.5 and not resume.state_reset and not resume.evidence


def test_resume_check_needs_the_start_of_training_to_judge():
    lineage = Lineage(_segments((5000, 5200), (5200, 5260), loss=lambda seg, step: 4.0 if seg else 2.0 + 0 * step))
    resume = check_resume(lineage, 1)
    assert not resume.state_reset and np.isnan(resume.initial_loss)


def test_moments_ratio_is_tiny_when_adam_state_starts_fresh_at_a_resume():
    steps = healthy_steps(n=20)
    layers = healthy_layers(steps)
    after = layers["step"] >= 10
    layers.loc[after, "exp_avg_sq_mean"] *= 0.05 ** 2  # (1 - beta2) g^2 after one fresh step, beta2 = 0.95
    assert moments_ratio(layers, before_step=9, after_step=10) < 0.01
    assert 0.8 < moments_ratio(layers, before_step=5, after_step=6) < 1.25


def test_a_clean_resume_is_analysed_as_one_healthy_run(tmp_path):
    steps = healthy_steps()
    write_run(tmp_path / "run", steps.iloc[:300])
    write_run(tmp_path / "run", steps.iloc[300:])
    diagnosis = analyze(tmp_path / "run")
    assert diagnosis.healthy
    assert diagnosis.summary["segments"] == 2
    assert diagnosis.summary["resumes"] == [{"segment": 1, "step": 300, "state_reset": False, "moments_ratio": None}]


def test_the_detector_keeps_its_baseline_across_a_resume(tmp_path):
    # A spike on the resumed segment's second step is found: its history comes from segment 0.
    steps = healthy_steps()
    steps.loc[301, "loss"] *= 1.5
    write_run(tmp_path / "run", steps.iloc[:300])
    write_run(tmp_path / "run", steps.iloc[300:])
    diagnosis = analyze(tmp_path / "run")
    assert [(i.onset_step, i.low_confidence) for i in diagnosis.incidents] == [(301, False)]
    assert diagnosis.context[0]["segment"] == 1


def test_an_incident_on_a_branch_rolled_back_from_is_reported_with_its_segment(tmp_path):
    steps = healthy_steps()
    first = steps.iloc[:450].copy()
    first.loc[420:, "loss"] *= 2.0  # segment 0 diverged at 420 ...
    again = steps.iloc[380:].copy()  # ... and was resumed from step 380 without the fault
    again["time"] += 1e4
    write_run(tmp_path / "run", first)
    write_run(tmp_path / "run", again)
    diagnosis = analyze(tmp_path / "run")
    assert [(i.onset_step, c["segment"]) for i, c in zip(diagnosis.incidents, diagnosis.context)] == [(420, 0)]
    assert diagnosis.summary["abandoned"] == [{"segment": 0, "first_step": 380, "last_step": 449}]


def test_optimizer_moments_not_restored_at_a_resume_is_state_reset(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    layers.loc[layers["step"] >= 300, "exp_avg_sq_mean"] *= 1e-3  # fresh Adam moments, beta2 = 0.999
    steps.loc[300:310, "loss"] *= 1.8  # fresh moments with full LR: large first steps
    write_run(tmp_path / "run", steps.iloc[:300], layers.loc[layers["step"] < 300])
    write_run(tmp_path / "run", steps.iloc[300:], layers.loc[layers["step"] >= 300])
    diagnosis = analyze(tmp_path / "run")
    inc = diagnosis.incidents[0]
    assert (inc.onset_step, inc.cause) == (300, "state_reset")
    assert any("the optimizer moments were not restored" in e for e in inc.evidence)


def test_moments_not_restored_without_any_incident_is_still_a_finding(tmp_path):
    steps = healthy_steps()
    layers = healthy_layers(steps)
    layers.loc[layers["step"] >= 300, "exp_avg_sq_mean"] *= 1e-3
    write_run(tmp_path / "run", steps.iloc[:300], layers.loc[layers["step"] < 300])
    write_run(tmp_path / "run", steps.iloc[300:], layers.loc[layers["step"] >= 300])
    diagnosis = analyze(tmp_path / "run")
    assert diagnosis.healthy
    finding = next(f for f in diagnosis.findings if f.id == "state_not_restored")
    assert finding.message.startswith("resume at step 300 (segment 1)") and finding.details["moments_ratio"] < 0.01
