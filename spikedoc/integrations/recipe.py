"""The resume recipe after an online stop: checkpoint, peak LR, clipping and data to skip, from `analyze`."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spikedoc.integrations.stopping import StopDecision

__all__ = ["ResumeRecipe", "resume_recipe"]

logger = logging.getLogger(__name__)

#: Steps by which analyze's onset of an incident may differ from the online one and still be it.
_ONSET_SLACK = 10


@dataclass(kw_only=True)
class ResumeRecipe:
    """How to resume after a stop: decisions as data (the integration words them for its framework).

    Example:
        >>> r = ResumeRecipe(onset_step=120, verdict="persistent", rollback_to_step=100,
        ...                  checkpoint="out/checkpoint-100", peak_lr=7e-4, clip_max_norm=0.5)
        >>> r.lines()[0]
        'persistent incident from step 120 (cause unknown)'
    """

    onset_step: int
    """First flagged step of the incident."""
    verdict: str
    """The online verdict that stopped training."""
    cause: str = "unknown"
    """The cause `analyze` names (`bad_batch`, `grad_explosion`, ...)."""
    evidence: list[str] = field(default_factory=list)
    """Why `analyze` names that cause."""
    rollback_to_step: int
    """Resume from the state before this step."""
    checkpoint: str | None = None
    """The saved checkpoint holding that state, when one was recorded."""
    peak_lr: float | None = None
    """Peak learning rate to resume with (the run's own when analysis advises no change)."""
    lr_changed: bool = False
    """Whether `peak_lr` is lower than the run's."""
    clip_max_norm: float | None = None
    """Max gradient norm to clip to on resuming (the run's own when no change is advised)."""
    clip_changed: bool = False
    """Whether `clip_max_norm` is tighter than the run's."""
    skip_steps: list[int] = field(default_factory=list)
    """Steps whose batches to skip on resuming."""
    skip_sample_ids: list[Any] = field(default_factory=list)
    """Sample ids to drop from the data, when the run recorded them."""
    skip_sample_positions: list[list[int]] = field(default_factory=list)
    """[start, stop) positions in the sample stream of batches to skip, when no ids were recorded."""
    skip_sample_positions_from: int | None = None
    """The resume step those positions are counted from (the resumed job gave `watch()` no
    `start_sample`); None when they count from the run's start."""
    analysis_error: str | None = None
    """Why `analyze` could not be used (the recipe then rests on the online judgement alone)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The recipe as short sentences, one per decision."""
        out = [f"{self.verdict} incident from step {self.onset_step} (cause {self.cause})"]
        out += [f"  evidence: {e}" for e in self.evidence[:3]]
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint recorded at or before it"
        out.append(f"roll back to step {self.rollback_to_step}: {where}")
        if self.peak_lr is not None:
            out.append(f"peak LR {self.peak_lr:.3g}" + (" (lowered)" if self.lr_changed else " (unchanged)"))
        if self.clip_max_norm is not None:
            out.append(f"clip the gradient norm to {self.clip_max_norm:g}" + (" (tightened)" if self.clip_changed else " (unchanged)"))
        if self.skip_steps:
            ids = f", sample ids {self.skip_sample_ids[:10]}" if self.skip_sample_ids else ""
            since = self.skip_sample_positions_from
            counted = f" (counted from the resume at step {since})" if since is not None else ""
            pos = f", sample positions {self.skip_sample_positions}{counted}" if self.skip_sample_positions else ""
            out.append(f"skip the batches of steps {self.skip_steps}{ids}{pos}")
        else:
            out.append("skip no data (no batch is implicated)")
        if self.analysis_error:
            out.append(f"(analysis failed: {self.analysis_error}; recipe from the online judgement only)")
        return out


def resume_recipe(
    run_dir: str | Path,
    decision: StopDecision,
    *,
    checkpoints: list[tuple[int, str]] | None = None,
    peak_lr: float | None = None,
    clip: float | None = None,
) -> ResumeRecipe:
    """Analyse the (flushed) run and turn its recommendation for the stopping incident into a recipe.

    `analyze` decides cause, rollback target, LR, clipping and data to skip exactly as `spikedoc
    analyze` would; when it fails or does not find the incident, the recipe rolls back to the last
    checkpoint before onset and keeps the LR and clipping.

    Args:
        run_dir: the run directory, its monitor closed (every row written).
        decision: the online stop decision.
        checkpoints: (step, path) of checkpoints saved so far; a checkpoint at step s holds the state
            before step s.
        peak_lr: the run's peak learning rate (kept when analysis advises no change).
        clip: the max norm the run clips to, None when it does not clip.

    Example:
        >>> recipe = resume_recipe("runs/x", decision, checkpoints=[(100, "out/checkpoint-100")])  # doctest: +SKIP
    """
    checkpoints = sorted(checkpoints or [])
    before = [(s, p) for s, p in checkpoints if s <= decision.onset_step]
    step, path = before[-1] if before else (0, None)
    recipe = ResumeRecipe(onset_step=decision.onset_step, verdict=decision.verdict, rollback_to_step=step,
                          checkpoint=path, peak_lr=peak_lr, clip_max_norm=clip)  # fmt: skip
    try:
        import spikedoc

        incidents = spikedoc.analyze(run_dir).incidents
    except Exception as exc:  # noqa: BLE001 - the stop stands; the recipe falls back
        logger.warning("spikedoc: analysing %s for the resume recipe failed", run_dir, exc_info=exc)
        recipe.analysis_error = repr(exc)
        return recipe
    near = [i for i in incidents if abs(i.onset_step - decision.onset_step) <= _ONSET_SLACK]
    if not near:
        recipe.analysis_error = f"no incident near step {decision.onset_step} among {len(incidents)}"
        return recipe
    _apply(recipe, min(near, key=lambda i: abs(i.onset_step - decision.onset_step)), checkpoints, peak_lr, clip)
    return recipe


def _apply(recipe: ResumeRecipe, incident: Any, checkpoints: list[tuple[int, str]], peak_lr: float | None,
           clip: float | None) -> None:  # fmt: skip
    rec = incident.recommendation
    recipe.cause, recipe.evidence = incident.cause, list(incident.evidence)
    # The analysis names no target where it judged the incident recovered: the online stop stands,
    # and its own target (the last checkpoint before onset) with it.
    named = rec.get("rollback_to_step")
    target = int(named) if named is not None else recipe.rollback_to_step
    saved = [(s, p) for s, p in checkpoints if s <= target]
    recipe.rollback_to_step = saved[-1][0] if saved else target
    recipe.checkpoint = rec.get("checkpoint_path") or (saved[-1][1] if saved else None)
    new_lr = rec.get("new_peak_lr")
    if new_lr is not None and math.isfinite(new_lr) and (peak_lr is None or new_lr < peak_lr):
        recipe.peak_lr, recipe.lr_changed = float(new_lr), True
    new_clip = rec.get("clip_max_norm")
    if new_clip is not None and (clip is None or new_clip < clip):
        recipe.clip_max_norm, recipe.clip_changed = float(new_clip), True
    recipe.skip_steps = [int(s) for s in rec.get("skip_steps", [])]
    recipe.skip_sample_ids = list(rec.get("skip_sample_ids", []))
    recipe.skip_sample_positions = [list(p) for p in rec.get("skip_sample_positions", [])]
    recipe.skip_sample_positions_from = rec.get("skip_sample_positions_from")
