"""Each rank's own loss band under data parallelism (DDP, FSDP2): a bad batch on one rank is judged
by that rank's loss against that rank's baseline, as it would be on one machine.

The mean loss over ranks dilutes one rank's anomaly by the number of ranks: a corrupt stretch of
data on one of two ranks moves the mean by half as much, and the mean's band sits at the edge of a
veto where the rank's own band is far past it. The judgement takes the largest departure of the
mean's band and of every rank's band (the same detector settings for all). Every rank holds every
rank's band, fed with the agreed per-rank losses (`StepValues.rank_losses`), so every rank reaches
the same verdict.
"""

from __future__ import annotations

import math
from typing import Any

from spikedoc.detector.streaming import DetectorConfig, Flag, StreamingDetector

__all__ = ["RankBands", "leading"]


class RankBands:
    """One streaming loss band per rank, built at the first step judged with per-rank losses.

    Example:
        >>> bands = RankBands(DetectorConfig())
        >>> for s in range(60):
        ...     bands.learn(bands.assess(s, (3.0 + 0.01 * (s % 5), 3.1 + 0.01 * (s % 3))))
        >>> [round(f.z) > 7 for f in bands.assess(60, (3.02, 6.0))]
        [False, True]
    """

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.detectors: list[StreamingDetector] = []

    def assess(self, step: int, losses: tuple[float, ...]) -> list[Flag | None]:
        """Each rank's loss judged against its own band, changing nothing (None: a non-finite loss,
        which the agreed non-finite count judges). A different number of ranks than the bands
        were built for (a resume on another world size) starts new, cold bands."""
        if len(losses) < 2:  # one process: the mean is the one rank's loss
            return []
        if len(losses) != len(self.detectors):
            self.detectors = [StreamingDetector(self.config) for _ in losses]
        return [d.assess(step, v) if math.isfinite(v) else None for d, v in zip(self.detectors, losses)]

    def learn(self, flags: list[Flag | None]) -> None:
        """Take in an applied step's assessments (those of `assess`, in order)."""
        for detector, flag in zip(self.detectors, flags):
            if flag is not None:
                detector.learn(flag)

    def state_dict(self) -> list[dict[str, Any]]:
        return [d.state_dict() for d in self.detectors]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore a `state_dict` (an empty list: no bands yet); ValueError when malformed."""
        if not isinstance(state, list):
            raise ValueError("checkpoint holds per-rank loss bands that are not a list")
        detectors = [StreamingDetector(self.config) for _ in state]
        for detector, saved in zip(detectors, state):
            detector.load_state_dict(saved)
        self.detectors = detectors


def leading(flags: list[Flag | None]) -> Flag | None:
    """The flag with the largest departure (z) among those judged, warm baselines first; None when
    none has a z (no flag, or baselines without history)."""
    judged = [f for f in flags if f is not None and not math.isnan(f.z)]
    return max(judged, key=lambda f: (f.warm, f.z)) if judged else None
