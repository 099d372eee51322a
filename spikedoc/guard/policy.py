"""The guard's running policy: clipping, LR scale and hold, budgets used, and every action taken."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Policy"]


@dataclass(kw_only=True)
class Policy:
    """What the guard's rollbacks and skips have changed so far (checkpointed with the state).

    Example:
        >>> p = Policy(clip=1.0); p.actions.append({"kind": "rollback", "moments_reset": True})
        >>> p.last_rollback()["moments_reset"], p.moments_reset()
        (True, True)
    """

    clip: float | None
    """The clipping norm in use (tightened by rollbacks)."""
    lr_scale: float = 1.0
    """Product of the LR factors of all rollbacks: the schedule in use is the original times this."""
    hold: dict[str, Any] | None = None
    """`{"from_step", "caps"}`: from that step each group's applied LR is at most its cap."""
    rollbacks: int = 0
    vetoes: int = 0
    data_skips: int = 0
    actions: list[dict[str, Any]] = field(default_factory=list)
    """What the guard did, in order: one dict per veto, replay, rollback, data skip and stop (as in the events)."""

    def caps(self, step: int) -> list[float] | None:
        """The LR caps that apply at `step` (an LR hold from its step on), or None."""
        return self.hold["caps"] if self.hold is not None and step >= self.hold["from_step"] else None

    def last_rollback(self) -> dict[str, Any] | None:
        return next((a for a in reversed(self.actions) if a["kind"] == "rollback"), None)

    def rollback_actions(self) -> list[dict[str, Any]]:
        return [a for a in self.actions if a["kind"] == "rollback"]

    def moments_reset(self) -> bool:
        """Some rollback so far reset every optimizer moment."""
        return any(a.get("moments_reset") for a in self.rollback_actions())

    def state_dict(self) -> dict[str, Any]:
        """Plain types (the actions stay with the process that took them)."""
        return {"clip": self.clip, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks, "vetoes": self.vetoes,
                "data_skips": self.data_skips, "hold": self.hold}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = state["clip"]
        self.lr_scale, self.rollbacks, self.vetoes = float(state["lr_scale"]), int(state["rollbacks"]), int(state["vetoes"])
        self.data_skips = int(state.get("data_skips", 0))
        self.hold = state["hold"]
