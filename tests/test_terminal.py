"""Specification of the terminal report's wording: what each number is, where it stands, in plain grammar."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

import spikedoc
from spikedoc.report.guard_words import action_line
from spikedoc.report.terminal import TABLE_LEGEND, action_text, render

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


def _text(run: str) -> str:
    console = Console(record=True, width=200, highlight=False)
    render(spikedoc.analyze(SAMPLES / run), console)
    return console.export_text()


def test_the_spike_score_comes_last_and_says_it_is_a_whole_run_rate_not_the_verdict():
    *before, last = _text("lr_surge").strip().split("\n\n")
    assert "spike score" not in "\n".join(before)
    last = " ".join(last.split())
    assert last.startswith("OLMo 2 spike score, a whole-run rate") and last.endswith("loss 0.000%, grad_norm 1.007%")


def test_the_incident_table_is_followed_by_the_meaning_of_its_columns():
    text = " ".join(_text("lr_surge").split())
    assert text.index("Incidents") < text.index(TABLE_LEGEND) < text.index("#1 loss_spike")


def test_counts_agree_with_their_nouns():
    text = " ".join(_text("optimizer_state").split())
    assert "(1 step before the loss flag)" in text and "1 steps" not in text
    one = {"action": "skip_data", "steps": [140], "sample_ids": ["a"], "positions": None}
    two = {**one, "steps": [140, 141]}
    assert action_text(one) == "skip the batch of step 140: sample ids a"
    assert action_text(two) == "skip the batches of steps 140, 141: sample ids a"
    assert "if rank 3 fails again" in action_text({"action": "check_rank", "ranks": [3]})
    assert "if it fails again" in action_text({"action": "check_rank", "ranks": []})
    assert "prefer bf16 over fp16" in action_text({"action": "check_rank", "ranks": [], "loss_scaled": True})
    assert "fp16" not in action_text({"action": "check_rank", "ranks": [], "loss_scaled": False})  # bf16 or fp32 already


def test_a_run_needing_no_attention_says_why():
    from spikedoc.analysis.diagnosis import Diagnosis
    from spikedoc.analysis.incident import Incident
    from spikedoc.report.terminal import settled_text

    def incident(severity: str, handled: bool) -> Incident:
        return Incident(kind="loss_spike", metric="loss", onset_step=10, peak_step=10, end_step=10, magnitude_sigma=9.0,
                        peak_ratio=2.0, baseline=3.0, peak_value=6.0, recovered=True, severity=severity,
                        handled_by_guard=handled)

    def said(*incidents: Incident) -> str:
        return settled_text(Diagnosis(path="runs/x", source="spikedoc", incidents=list(incidents)))

    assert said(incident("minor", False)) == "only minor incidents"
    assert said(incident("severe", True)) == "handled by the guard"
    assert said(incident("severe", True), incident("minor", False)).startswith("the guard handled the larger incidents")
    assert said(incident("moderate", False)) == "nothing to act on: the run recovered by itself"


def test_guard_details_from_the_run_are_printed_as_text_not_markup():
    from spikedoc.analysis.diagnosis import Diagnosis

    stop = {"kind": "guard_stop", "step": 7, "segment": 0, "detail": {"reason": "[/red][bold]budget[/bold] spent"}}
    console = Console(record=True, width=200, highlight=False)
    render(Diagnosis(path="runs/x", source="spikedoc", guard_actions=[stop]), console)
    assert "stopped at step 7: [/red][bold]budget[/bold] spent" in console.export_text()


def test_a_veto_judged_on_one_ranks_own_loss_names_that_rank():
    diagnosis = spikedoc.analyze(SAMPLES / "lr_surge")
    veto = {"kind": "veto", "step": 140, "segment": 0,
            "detail": {"reasons": ["loss_out_of_band"], "loss_z": 19.5, "grad_norm_z": 1.2, "loss_rank": 1}}
    diagnosis.guard_actions = [veto, {**veto, "step": 141, "detail": {**veto["detail"], "loss_rank": None}}]
    console = Console(record=True, width=200, highlight=False)
    render(diagnosis, console)
    lines = [line for line in console.export_text().splitlines() if line.strip().startswith("veto of step")]
    assert "the loss of rank 1" in lines[0] and "rank" not in lines[1]


def test_a_non_finite_peak_says_non_finite_once():
    line = next(x for x in _text("nan").splitlines() if x.startswith("#1 nonfinite"))
    assert "(non-finite)" in line and "non-finite, non-finite" not in line


def test_a_guard_setting_equal_in_every_param_group_is_said_once():
    rollback = {"kind": "rollback", "step": 200, "detail": {"from_step": 279, "reason": "recovered_with_damage",
                                                             "cause": "lr_schedule",
                                                             "lr_held": {"at": [0.00136, 0.00136], "from_step": 250}}}
    assert "LR held at 0.00136 (every param group) from step 250" in action_line(rollback)


def test_a_guard_setting_that_differs_between_param_groups_lists_each():
    rollback = {"kind": "rollback", "step": 200, "detail": {"from_step": 279, "reason": "recovered_with_damage",
                                                             "cause": "lr_schedule",
                                                             "lr_held": {"at": [0.00136, 0.00068], "from_step": 250}}}
    assert "LR held at 0.00136, 6.80e-04 from step 250" in action_line(rollback)
