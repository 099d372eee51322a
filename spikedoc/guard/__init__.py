"""The guard: inside a long run, veto bad steps, checkpoint, and roll back damage within a budget."""

from spikedoc.errors import GuardStopped
from spikedoc.guard.checkpoint import CheckpointError
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.guard import Guard

__all__ = ["Guard", "GuardConfig", "GuardStopped", "CheckpointError"]
