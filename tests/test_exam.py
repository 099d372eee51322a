"""The exam (bench/exam.py): its labels are well-formed and measured against a twin that is the same
run before the fault, its scoring calls advice insane where it is, and analyze, on a stratified slice
of the test half generated here, meets what it meets today (its open targets are in BENCHMARKS.md)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench._exam_design import CAUSE, EXTRA, labels, twin_diverged
from bench._exam_score import score_run, tables
from bench._exam_train import Fault, Setup, as_dict, train
from bench.exam import BASES, Cache, design, generate, score, ci_slice
from spikedoc.analysis.incident import CAUSES, Incident

SLICE = ci_slice(design(BASES), per_family=2, clean=4)


@functools.cache
def _cache() -> Cache:
    cache = Cache(Path(tempfile.mkdtemp(prefix="spikedoc-exam-slice-")))
    generate(SLICE, cache, workers=1)
    return cache


@functools.cache
def _rows() -> list[dict]:
    return score(SLICE, _cache())


def _labels() -> list[dict]:
    cache = _cache()
    return [labels(s, f, cache.record(s, f), cache.record(s, None)) for s, f in SLICE]


# ------------------------------------------------------------------------------------ the slice


def test_the_slice_is_from_the_test_half_and_covers_every_family_and_clean_runs():
    assert {s.seed % 2 for s, _ in SLICE} == {1}
    families = [f.family for _, f in SLICE if f is not None]
    assert all(families.count(fam) >= 2 for fam in CAUSE)
    assert sum(f is None for _, f in SLICE) >= 4


def test_the_runs_drawn_from_streams_of_their_own_leave_every_earlier_run_of_the_design_as_it_was():
    # The digest of the first 20 bases' specs as the design drew them before it held rescaled resumes
    # and extra draws (each base's last runs): the cache is keyed by spec, so a changed draw would
    # silently train (and score) other runs.
    bases: dict[Setup, list] = {}
    for setup, fault in design(20):
        bases.setdefault(setup, []).append(fault)
    own = [faults[-1 - len(EXTRA):] for faults in bases.values()]
    runs = [as_dict(s, f) for s, faults in bases.items() for f in faults[: -1 - len(EXTRA)]]
    assert len(runs) == 70
    assert hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()[:16] == "f8cae37f22045c7a"
    assert [[f.family for f in faults] for faults in own] == [["lr_restart", *EXTRA]] * 20
    assert all(faults[0].kind == "rescaled" for faults in own)


def test_no_base_holds_the_same_run_twice():
    runs = design(2 * BASES)
    assert len(set(runs)) == len(runs)


def test_a_rescaled_resume_runs_its_twin_s_lr_times_its_factor_from_the_resume_on(tmp_path):
    setup, fault = Setup(seed=5001, steps=30, warmup=6), Fault(family="lr_restart", kind="rescaled", step=17, factor=4.0)
    lr = {}
    for name, f in (("twin", None), ("run", fault)):
        train(setup, f, tmp_path / name, tmp_path / f"{name}-ckpt")
        steps = pd.read_parquet(tmp_path / name / "steps").sort_values("step")
        lr[name] = steps.set_index("step")["lr"]
        assert sorted(steps["segment"].unique()) == ([0] if f is None else [0, 1])  # a resume: a new segment
    assert (lr["run"].loc[:16] == lr["twin"].loc[:16]).all()
    assert np.allclose(lr["run"].loc[17:], 4.0 * lr["twin"].loc[17:])


def test_every_label_is_well_formed():
    for lab in _labels():
        if lab["family"] == "clean":
            continue
        assert lab["cause"] in CAUSES and lab["cause"] == CAUSE[lab["family"]]
        assert lab["band"] in ("none", "small", "must_find")
        assert lab["onset_range"][0] == lab["planted_step"] <= lab["onset_range"][1]
        assert lab["peak_ratio"] > 0 and not math.isnan(lab["damage"])
        assert lab["rollback"]["step"] <= lab["onset_range"][1]
        if lab["rollback"]["checkpoint"] is not None:
            writes = [step for step, path in lab["checkpoints"] if path == lab["rollback"]["checkpoint"]]
            assert max(writes) == lab["rollback"]["checkpoint_step"] <= lab["rollback"]["step"]


def test_the_faulty_run_is_its_twin_step_for_step_before_the_fault():
    for lab in _labels():
        if lab["family"] not in ("clean", "instability"):  # an instability is the recipe: it differs from step 0
            assert lab["same_until"] is None or lab["same_until"] >= lab["planted_step"]


def test_a_non_finite_fault_is_labelled_must_find_with_infinite_damage():
    nonfinite = [lab for lab in _labels() if lab["family"] == "nonfinite"]
    assert nonfinite and all(lab["band"] == "must_find" and lab["damage"] == math.inf for lab in nonfinite)


# ------------------------------------------------------------------------------------ analyze on the slice


def test_analyze_finds_every_non_finite_fault():
    rows = [r for r in _rows() if r["family"] == "nonfinite"]
    assert rows and all(r["found"] for r in rows)


def test_analyze_names_every_weight_reset_state_reset():
    rows = [r for r in _rows() if r["family"] == "state_reset"]
    assert rows and all(r["got"] == "state_reset" for r in rows)


def test_analyze_advises_no_state_reload_on_a_clean_run():
    # (No alarm at all on a clean run is a target analyze misses today: see BENCHMARKS.md, exam.)
    clean = [r for r in _rows() if r["family"] == "clean"]
    assert len(clean) >= 4 and not any(r["insane"] for r in clean)


def test_analyze_calls_a_non_finite_run_damaged():
    rows = [r for r in _rows() if r["family"] == "nonfinite"]
    assert all(r["said_damaged"] for r in rows)


# ------------------------------------------------------------------------------------ scoring rules


def _incident(**recommendation) -> Incident:
    inc = Incident(kind="loss_spike", metric="loss", onset_step=60, peak_step=60, end_step=62, magnitude_sigma=9.0,
                   peak_ratio=2.0, baseline=3.0, peak_value=6.0, recovered=True)  # fmt: skip
    inc.recommendation = {"rollback": True, "actions": [], **recommendation}
    return inc


def _fault_labels(family: str, checkpoints: list) -> dict:
    record = {"loss": [3.0] * 100, "eval_loss": 3.0, "checkpoints": checkpoints}
    kind = {"bad_batch": "random", "nonfinite": "loss_nan", "state_reset": "reinit"}[family]
    return labels(Setup(seed=1, steps=100), Fault(family=family, kind=kind, step=60), record, record)


class _Diagnosis:
    def __init__(self, *incidents: Incident) -> None:
        self.incidents = list(incidents)


def test_a_rollback_after_the_onset_is_insane():
    lab = _fault_labels("bad_batch", [])
    assert score_run(lab, _Diagnosis(_incident(rollback_to_step=61)))["insane"]
    assert not score_run(lab, _Diagnosis(_incident(rollback_to_step=60)))["insane"]


def test_naming_a_checkpoint_file_written_again_after_the_onset_is_insane():
    lab = _fault_labels("bad_batch", [[40, "ckpt.pt"], [80, "ckpt.pt"]])
    assert lab["rollback"]["checkpoint"] is None and lab["rollback"]["overwritten"] == ["ckpt.pt"]
    row = score_run(lab, _Diagnosis(_incident(rollback_to_step=40, checkpoint_path="ckpt.pt")))
    assert row["insane"] == ["names ckpt.pt, overwritten at step 80"]


def test_the_right_checkpoint_is_the_newest_file_that_still_holds_a_state_before_the_onset():
    lab = _fault_labels("bad_batch", [[20, "a.pt"], [40, "b.pt"], [80, "c.pt"]])
    assert (lab["rollback"]["checkpoint_step"], lab["rollback"]["checkpoint"]) == (40, "b.pt")


def test_lr_or_clip_advice_for_a_non_finite_value_is_insane():
    lab = _fault_labels("nonfinite", [])
    inc = _incident(rollback_to_step=50, actions=[{"action": "rollback"}, {"action": "lower_lr"}])
    assert score_run(lab, _Diagnosis(inc))["insane"] == ["LR/clip advice for a non-finite value without build-up"]


@pytest.mark.parametrize("family, sane", [("state_reset", True), ("bad_batch", False)])
def test_a_state_reload_is_sane_only_after_a_reset(family, sane):
    inc = _incident(rollback_to_step=50, actions=[{"action": "load_state"}])
    assert bool(score_run(_fault_labels(family, []), _Diagnosis(inc))["insane"]) is not sane


@pytest.mark.parametrize(("loss", "diverged"), [
    ([5.5, 4.0, 3.5, 3.2, 3.0, 3.1], False),  # learning, with noise
    ([5.5, 4.0, 3.5, 9.0, 6.0, 3.4], True),  # above the untrained loss after warmup, back later
    ([5.5, 4.0, 3.5, 3.2, float("nan"), float("nan")], True),  # non-finite
    ([5.5, 5.6, 4.0, 3.5, 3.2, 3.0], False),  # above it inside the warmup only
])  # fmt: skip
def test_a_twin_diverged_by_itself_when_its_loss_passes_the_untrained_level_after_warmup(loss, diverged):
    assert twin_diverged(Setup(seed=1, steps=len(loss), warmup=2), {"loss": loss}) is diverged


def test_the_scores_leave_out_every_run_of_a_base_whose_twin_diverged():
    twin = {"loss": [5.5, 4.0, 9.0, 3.0], "eval_loss": 3.0, "checkpoints": []}
    setup = Setup(seed=1, steps=4, warmup=1)
    clean = score_run(labels(setup, None, twin, twin), _Diagnosis(_incident()))
    faulty = score_run(labels(setup, Fault(family="bad_batch", kind="random", step=2), twin, twin), _Diagnosis())
    _, head = tables([clean, faulty])
    assert clean["twin_diverged"] and faulty["twin_diverged"] and head["runs"] == 0
