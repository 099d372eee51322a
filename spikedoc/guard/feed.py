"""Which batches each guarded step trains on: the data stream's, a replay's, or a drawing loop's draws."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spikedoc.guard.data import DataStream
from spikedoc.guard.draws import Draws
from spikedoc.guard.replaying import ReplaySteps
from spikedoc.guard.steps import PendingStep
from spikedoc.monitor import Monitor

__all__ = ["Feed"]


class Feed:
    """Hands batches to the guarded loop and notes which data positions each step took.

    A loop that iterates the guard gets each step's first batch from `begin` and its further
    micro-batches from `micro_batch`; a loop that draws its own (`get_batch = guard.draw`) gets them
    from `draw`, and its step claims the first ones its forwards took (`claim_draws`). A replay step
    hands out the replay's batches instead of the stream's next ones.

    Args:
        stream: The data (`DataStream`), with its skip list.
        draws: The batches a drawing loop holds ahead of its step.
        replays: The replay steps a waiting cause test calls for.
        accumulate: Micro-batches per optimizer step.
        monitor: The guard's current monitor (it changes at each rollback).
        untested: Called when a replay cannot be handed to the loop: the guard acts on its decision untested.
    """

    def __init__(self, stream: DataStream, draws: Draws, replays: ReplaySteps, *, accumulate: int,
                 step: Callable[[], int], monitor: Callable[[], Monitor], untested: Callable[[], None]) -> None:  # fmt: skip
        self.stream, self.draws, self._replays, self._accumulate = stream, draws, replays, accumulate
        self._step, self._monitor, self._untested = step, monitor, untested

    def micro_batch(self, p: PendingStep | None) -> tuple[int, Any] | None:
        """The next micro-batch of the step `p` not yet judged; None when it has all of them."""
        if p is None or p.verdict is not None or p.handed >= self._accumulate:
            return None
        p.handed += 1
        if p.probe is not None:
            return p.step, p.batches[(p.handed - 1) % len(p.batches)]
        position, batch = self.next_batch()
        p.positions.append(position)
        p.batches.append(batch)
        return p.step, batch

    def begin(self, *, drawing: bool) -> PendingStep:
        """The guard's next step begun: the replay step a waiting test calls for, else an ordinary
        step (with its first batch from the stream, unless the loop draws its own). A replay the loop
        cannot take rolls back first: the step is then the one rolled back to."""
        p = self._begin_probe(self._step(), drawing=drawing)
        if p is None and not drawing:
            position, batch = self.next_batch()
            return PendingStep(step=self._step(), positions=[position], batches=[batch],
                               sample_offset=self._monitor().sample_offset)  # fmt: skip
        if p is None:
            p = PendingStep(step=self._step(), positions=[], sample_offset=self._monitor().sample_offset)
        p.claim_draws = drawing  # a drawing loop's forwards take its batches, a replay's included
        return p

    def draw(self, *args: Any, **kwargs: Any) -> Any:
        """The next training batch, for a loop that draws its own (see `Guard.draw`)."""
        if not torch.is_grad_enabled() and self.stream.kind == "callable":
            return self.stream.data(*args, **kwargs)
        position, batch = self.draws.replayed() or self.next_batch(*args, **kwargs)
        self.draws.add(position, batch)
        return batch

    def claim_draws(self, p: PendingStep) -> None:
        """A drawing loop's step: its batches are the first ones its forwards took, in order."""
        if p.claim_draws:
            p.claim_draws = False
            taken = self.draws.take(p.forwards)
            p.positions, p.batches = [position for position, _ in taken], [batch for _, batch in taken]

    def next_batch(self, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        """The stream's next (position, batch), past the skip list."""
        position, batch = self.stream.next(*args, **kwargs)
        # Skipped batches are drawn but never trained on: counted, so that the monitor's sample
        # offsets (the stream positions analyze names) stay those of the data stream.
        if self.stream.skipped_samples:
            self._monitor().skip_samples(self.stream.skipped_samples)
        return position, batch

    def _begin_probe(self, step: int, *, drawing: bool) -> PendingStep | None:
        """The replay step a waiting test calls for, begun (`ReplaySteps.begin`; None: none waits).
        Where a drawing loop holds batches of another shape, the decision is acted on untested."""
        probe, dropped = self._replays.begin(step, drawing=drawing)
        if dropped:
            self._untested()
        return probe
