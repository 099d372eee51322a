"""Glue for training loops that own their step: HF Trainer, Lightning, torch.distributed.

`spikedoc.integrations.hf.SpikedocCallback` and `spikedoc.integrations.lightning.SpikedocCallback`
import their framework when imported (install the `hf` or `lightning` extra); this package itself
imports neither.
"""

from spikedoc.integrations.recipe import ResumeRecipe, resume_recipe
from spikedoc.integrations.stopping import IncidentWatch, StopConfig, StopDecision

__all__ = ["IncidentWatch", "StopConfig", "StopDecision", "ResumeRecipe", "resume_recipe"]
