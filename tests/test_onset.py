"""What counts as a build-up before a fault (spikedoc/analysis/onset.py)."""

from __future__ import annotations

import math

from spikedoc.analysis.attribution import LayerAttribution
from spikedoc.analysis.causes import Evidence
from spikedoc.analysis.config import AnalysisConfig
from spikedoc.analysis.incident import Incident
from spikedoc.analysis.onset import build_up

NAN_AT = 300


def _nonfinite() -> Incident:
    return Incident(kind="nonfinite", metric="grad_norm", onset_step=NAN_AT, peak_step=NAN_AT, end_step=NAN_AT + 5,
                    magnitude_sigma=math.inf, peak_ratio=math.inf, baseline=1.3, peak_value=math.nan, recovered=False)  # fmt: skip


def _departed(step: int, grown: float = 6.2) -> LayerAttribution:
    """A tensor departing at `step` whose gradient went non-finite at the NaN, `grown` sigma off its
    history at its largest finite value before (NaN: never finite in the incident)."""
    row = {"name": "wpe.weight", "module": "embeddings", "z": 9.7, "grad_z": math.inf, "grad_z_finite": grown,
           "update_z": 1.0, "lead_steps": NAN_AT - step, "departed_step": step}  # fmt: skip
    return LayerAttribution(layers=[row], earliest_step=step)


_SATURATED = {"saturated": True, "share": 0.93, "steps": 100, "median_coef": 0.78, "run_share": 0.38}


def test_a_tensor_departing_tens_of_steps_before_a_nan_is_no_build_up():
    ev = Evidence(layers=_departed(NAN_AT - 34), clipping=_SATURATED)
    assert build_up(_nonfinite(), ev, NAN_AT, AnalysisConfig()) is None


def test_a_tensor_departing_just_before_a_nan_is_a_build_up():
    cfg = AnalysisConfig()
    ev = Evidence(layers=_departed(NAN_AT - cfg.build_up_steps - 1))
    found = build_up(_nonfinite(), ev, NAN_AT, cfg)
    assert found is not None and found["step"] == NAN_AT - cfg.build_up_steps - 1


def test_a_departure_whose_gradient_only_broke_at_the_nan_is_no_build_up():
    # Its update ratio left its history before the NaN, its gradient never did while finite: the
    # infinite gradient z of the step that broke is the break, not a growth before it.
    cfg = AnalysisConfig()
    ev = Evidence(layers=_departed(NAN_AT - cfg.build_up_steps - 1, grown=math.nan))
    assert build_up(_nonfinite(), ev, NAN_AT, cfg) is None


def test_clipping_active_before_onset_is_no_build_up_on_its_own():
    assert build_up(_nonfinite(), Evidence(clipping=_SATURATED), NAN_AT, AnalysisConfig()) is None
