"""The guard's judgement and remedy as data: veto rule, incidents, LR-jump cause, implicated tensors."""

from __future__ import annotations

import math

import torch

from spikedoc.analysis.detect import DetectorConfig, StreamingDetector
from spikedoc.guard.agree import StepValues
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Decision, Judge
from spikedoc.guard.remedy import plan_remedy, reset_implicated


def _loss(step: int) -> float:
    return 3.0 + 0.01 * ((step * 7) % 11 - 5)  # a flat loss with a fixed small ripple


def _warm(judge: Judge, steps: int = 120, lr: float = 1e-3) -> None:
    for s in range(steps):
        judge.record(judge.judge(s, StepValues(_loss(s), 0.5, 0, 0)), lrs=[lr])


def test_assess_judges_like_update_and_leaves_the_detector_unchanged():
    det, twin = StreamingDetector(), StreamingDetector()
    for s in range(100):
        det.update(s, _loss(s))
        twin.update(s, _loss(s))
    before = det.state_dict()
    assessed = det.assess(100, 9.0)
    assert det.state_dict() == before
    assert assessed == twin.update(100, 9.0) and assessed.flagged


def test_learning_each_assessment_leaves_the_detector_as_update_would():
    config = DetectorConfig(persist_steps=8)  # short, so that the departure below re-seeds the baseline
    learner, updater = StreamingDetector(config, log_scale=True), StreamingDetector(config, log_scale=True)
    # in band, out of band, non-finite, non-positive, then a lasting departure
    values = [0.5 + 0.01 * (s % 3) for s in range(80)] + [50.0, math.nan, 0.0, -1.0] + [5.0] * 12
    readapted = []
    for s, v in enumerate(values):
        flag = learner.assess(s, v)
        readapted.append(learner.learn(flag))
        assert repr(flag._replace(readapted=readapted[-1])) == repr(updater.update(s, v))  # repr: nan equals nan
        assert learner.state_dict() == updater.state_dict()
    assert any(readapted)


def _bands(judge: Judge) -> tuple[dict, dict]:
    return judge.loss_detector.state_dict(), judge.grad_detector.state_dict()


def test_a_vetoed_step_leaves_both_bands_as_they_were():
    judge = Judge(GuardConfig())
    _warm(judge)
    before = _bands(judge)
    verdict = judge.judge(120, StepValues(_loss(120), 50.0, 0, 0))  # the loss in band, the grad norm far out
    assert verdict.veto and verdict.reasons == ("grad_norm_out_of_band",)
    judge.record(verdict, lrs=[1e-3])
    assert _bands(judge) == before


def test_an_applied_step_is_learnt_once_as_by_the_detectors_themselves():
    judge, loss_only, grad_only = Judge(GuardConfig()), StreamingDetector(), StreamingDetector(log_scale=True)
    for s in range(130):
        judge.record(judge.judge(s, StepValues(_loss(s), 0.5 + 0.01 * (s % 3), 0, 0)), lrs=[1e-3])
        loss_only.update(s, _loss(s))
        grad_only.update(s, 0.5 + 0.01 * (s % 3))
    assert _bands(judge) == (loss_only.state_dict(), grad_only.state_dict())


def test_a_judgement_not_recorded_is_withdrawn_by_the_next_one():
    judge, twin = Judge(GuardConfig()), Judge(GuardConfig())
    _warm(judge)
    _warm(twin)
    judge.judge(120, StepValues(_loss(120) + 0.02, 0.6, 0, 0))  # judged, never recorded
    judge.record(judge.judge(120, StepValues(_loss(120), 0.5, 0, 0)), lrs=[1e-3])
    twin.record(twin.judge(120, StepValues(_loss(120), 0.5, 0, 0)), lrs=[1e-3])
    assert _bands(judge) == _bands(twin)


def test_only_a_warm_band_vetoes_a_finite_value_but_a_non_finite_one_always_is():
    cold = Judge(GuardConfig())
    _warm(cold, steps=10)
    assert not cold.judge(10, StepValues(30.0, 0.5, 0, 0)).veto  # 10 values: not enough to be sure
    assert cold.judge(10, StepValues(math.nan, math.nan, 1, 0)).veto
    warm = Judge(GuardConfig())
    _warm(warm)
    verdict = warm.judge(120, StepValues(30.0, 0.5, 0, 0))
    assert verdict.veto and verdict.reasons == ("loss_out_of_band",)
    assert not warm.judge(120, StepValues(_loss(120), 0.5, 0, 0)).veto


def test_a_rise_that_is_not_vetoed_opens_an_incident_and_a_lasting_one_decides_a_rollback():
    judge = Judge(GuardConfig(veto_sigma=1e6))  # nothing vetoed: the damage judgement alone acts
    _warm(judge)
    decision = None
    for s in range(120, 200):
        decision = judge.record(judge.judge(s, StepValues(_loss(s) + 1.0, 0.5, 0, 0)), lrs=[1e-3])
        if s == 120:
            assert judge.incident is not None and judge.incident.onset_step == 120
        if decision is not None:
            break
    assert decision is not None and decision.reason in ("persistent", "divergence")
    assert (decision.onset_step, decision.cause) == (120, "damage") and s <= 120 + 50


def test_a_rise_that_comes_back_closes_the_incident_without_a_rollback():
    judge = Judge(GuardConfig(veto_sigma=1e6))
    _warm(judge)
    decisions = [judge.record(judge.judge(s, StepValues(_loss(s) + (1.0 if s == 120 else 0.0), 0.5, 0, 0)), lrs=[1e-3])
                 for s in range(120, 180)]  # fmt: skip
    assert decisions == [None] * 60 and judge.incident is None


def test_an_lr_jump_before_onset_makes_the_cause_lr_schedule_and_the_target_precede_it():
    judge = Judge(GuardConfig(veto_sigma=1e6))
    _warm(judge)
    for s in range(120, 125):
        judge.record(judge.judge(s, StepValues(_loss(s), 0.5, 0, 1 if s == 124 else 0)), lrs=[1e-2 if s >= 122 else 1e-3])
    decision = judge.record(judge.judge(125, StepValues(_loss(125), 0.5, 0, 1)), lrs=[1e-2])
    assert decision.reason == "requested" and decision.cause == "lr_schedule"
    assert decision.precursor_step == 122 and decision.lr_jump["lrs_before"] == [1e-3]
    remedy = plan_remedy(decision, config=GuardConfig(), clip=1.0, lr_scale=1.0, hold=None, batches={})
    assert (remedy.clip, remedy.lr_scale, remedy.hold) == (1.0, 1.0, {"from_step": 122, "caps": [1e-3]})


def test_a_damage_rollback_scales_the_lr_tightens_clipping_and_skips_the_attributed_batches_with_a_window():
    decision = Decision(reason="vetoes", onset_step=50, precursor_step=50, cause="damage", attributed_steps=[50, 51])
    batches = {50: ([60], ["a", "b"]), 51: ([61], ["c"])}
    remedy = plan_remedy(decision, config=GuardConfig(skip_window=2), clip=2.0, lr_scale=0.7, hold=None, batches=batches)
    assert (remedy.clip, remedy.lr_scale) == (1.0, 0.7 * 0.7)
    assert remedy.skip_positions == [58, 59, 60, 61, 62, 63] and remedy.skip_sample_ids == ["a", "b", "c"]


def test_reset_moments_drops_only_the_state_of_the_tensor_whose_gradient_led():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    params = list(model.parameters())
    calm = torch.ones(len(params))
    onset = calm.clone()
    onset[2] = 10.0  # the second layer's weight
    norms = {s: (calm, params) for s in range(40, 50)} | {50: (onset, params)}
    decision = Decision(reason="persistent", onset_step=50, precursor_step=50, cause="damage")
    assert reset_implicated(model, opt, decision, norms) == ["1.weight"]
    assert params[2] not in opt.state and all(p in opt.state for i, p in enumerate(params) if i != 2)


def test_vetoes_piling_up_not_in_a_row_open_an_incident_at_the_first():
    judge = Judge(GuardConfig())
    _warm(judge)
    for s in range(120, 130):
        spike = s % 2 == 0
        verdict = judge.judge(s, StepValues(30.0 if spike else _loss(s), 0.5, 0, 0))
        assert verdict.veto == spike
        assert judge.record(verdict, lrs=[1e-3]) is None
    assert judge.incident is not None and judge.incident.onset_step == 120
    assert judge.incident.attributed_steps == [120, 122, 124, 126, 128]
    assert judge.incident.precursor_step == 119  # the loss of step 120 shows the update of step 119


def test_a_judgement_restored_mid_incident_decides_exactly_as_the_original():
    import io

    config = GuardConfig(veto_sigma=1e6)
    original = Judge(config)
    _warm(original)
    for s in range(120, 130):
        original.record(original.judge(s, StepValues(_loss(s) + 1.0, 0.5, 0, 0)), lrs=[1e-3])
    assert original.incident is not None
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)  # plain types: a checkpoint loads them with weights_only=True
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = Judge(config)
    restored.load_state_dict(saved)
    for s in range(130, 200):
        values = StepValues(_loss(s) + 1.0, 0.5, 0, 0)
        a = original.record(original.judge(s, values), lrs=[1e-3])
        b = restored.record(restored.judge(s, values), lrs=[1e-3])
        assert a == b
        if a is not None:
            break
    assert a is not None and a.reason == "persistent"
