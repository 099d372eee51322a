"""Evidence: everything attribution and context found for one incident, the input of the cause rules and the advice."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from spikedoc.analysis.attribution import LayerAttribution
from spikedoc.analysis.lineage import Resume

__all__ = ["Evidence", "MIN_LOOKBACK"]

#: Logged steps before onset needed to say that nothing built up there.
MIN_LOOKBACK = 10


@dataclass(kw_only=True)
class Evidence:
    """Everything attribution and context found for one incident; the input of `decide_cause`."""

    loss_flag_step: int | None = None
    """First step the loss itself was flagged (None for a grad-norm-only incident)."""
    batches: list[dict[str, Any]] = field(default_factory=list)
    """Candidate onset batches (`attribute_batches`)."""
    stretch: list[dict[str, Any]] = field(default_factory=list)
    """Batches after onset, inside the incident and in an unbroken run just after it, with an anomaly
    of the kind an onset batch has: a corrupt stretch of data rather than one batch."""
    one_step: bool = False
    """The incident's first series was out of the band at its onset step only, back in it right after."""
    layers: LayerAttribution | None = None
    grad_precursor: dict[str, Any] | None = None
    """`step`, `lead_steps`, `sentence`: the grad norm flagged before the loss."""
    lr_jump: dict[str, Any] | None = None
    """Upward LR discontinuity in the lookback window (`lr_discontinuities` entry, plus `at_resume`)."""
    lr_onset: float = math.nan
    warmup: dict[str, Any] | None = None
    clipping: dict[str, Any] | None = None
    loss_scale: dict[str, Any] | None = None
    ranks: dict[str, Any] | None = None
    resume: Resume | None = None
    """The resume the incident follows closely, if any."""
    moments_ratio: float | None = None
    """exp_avg_sq after / before that resume (median over tensors)."""
    update_step: dict[str, Any] | None = None
    """`update_without_grad` on the step table."""
    state_jump: int | None = None
    """A step at onset or the two before whose update per unit LR jumped from the step before while
    its gradient norm did not (`change_points.state_jumps`): its step-to-step test needs 20 steps of
    history, where `update_step`'s level test needs its history to end `lookback / 4` steps before onset."""
    grad_before: float = math.nan
    """Gradient norm at the last logged step before onset."""
    has_grad: bool = False
    """The step table has a finite gradient norm somewhere."""
    has_loss: bool = True
    """The step table has a finite loss somewhere (else nothing can be said about its reaction)."""
    lookback_steps: int = 0
    """Logged steps in the lookback window before onset (the data a "no build-up" claim rests on)."""
    notes: list[str] = field(default_factory=list)
    """What could not be checked (missing columns, short history)."""
    reset_level: dict[str, Any] | None = None
    """The loss back most of the way to its untrained level for several steps: `initial`, `level`,
    `baseline`, `share`, `steps`."""
    param_reset: dict[str, Any] | None = None
    """The parameter norm went back most of the way to its value at the start of the run: `initial`,
    `before`, `after`, `share`. None also when the parameter norm was not logged (`has_param_norm`)."""
    has_param_norm: bool = False
    scaler_skipped: bool = False
    """A loss scaler skipped the onset step's update (the `skipped` column)."""
    minor: bool = False
    """The incident is minor (recovered, a blip): a cause is named only on evidence beyond its shape."""
    build_up: dict[str, Any] | None = None
    """Finite departures at least `build_up_steps` ahead of the first non-finite value or the loss
    flag: `step`, `lead_steps`, `sentences`. A one-step lead of the gradient norm over the loss is the
    order they are measured in (the loss of step t shows the update of step t-1), not a build-up."""
    first_nonfinite: dict[str, Any] | None = None
    """The first non-finite value of a non-finite incident: `step`, `what` (a sentence naming the
    series or tensors), `loss_finite` (the loss of that step was finite: its batch's backward or
    the update broke, the state before the step is good)."""

    @property
    def nonfinite_out_of_nowhere(self) -> bool:
        """A non-finite value with no build-up before it, over enough logged steps (`MIN_LOOKBACK`)
        to tell: numerics (an overflow on one batch, a corrupted value or device), which a smaller
        step or a tighter clip does not prevent."""
        return self.first_nonfinite is not None and self.build_up is None and self.lookback_steps >= MIN_LOOKBACK
