"""Batches a loop drew through `Guard.draw` and holds ahead of its step (a prefetch), kept across rollbacks."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from spikedoc.guard.data import batch_to, copy_into

__all__ = ["Draws"]


class Draws:
    """The (position, batch) pairs drawn and not yet taken by a step, and those a resume hands back.

    Example:
        >>> d = Draws(); d.add(0, "a"); d.add(1, "b"); d.take(1), d.held()
        ([(0, 'a')], [[1, 'b']])
    """

    def __init__(self) -> None:
        self._drawn: deque[tuple[int, Any]] = deque()
        """(position, batch) drawn by the loop through `draw` and not yet taken by a step (prefetched)."""
        self._replay: deque[tuple[int, Any]] = deque()
        """Batches a resumed checkpoint's loop held: the next `draw` calls return them."""

    def add(self, position: int, batch: Any) -> None:
        """A batch the loop drew (and holds until a step's forward takes it)."""
        self._drawn.append((position, batch))

    def replayed(self) -> tuple[int, Any] | None:
        """The next batch a resumed checkpoint's loop held, if any is left to hand back."""
        return self._replay.popleft() if self._replay else None

    def take(self, forwards: int) -> list[tuple[int, Any]]:
        """The step's (position, batch) pairs: the first ones its `forwards` took, in order."""
        return [self._drawn.popleft() for _ in range(min(len(self._drawn), max(forwards, 1)))]

    def held(self) -> list[list[Any]]:
        """[position, batch] of each batch the loop holds now (a checkpoint stores them)."""
        return [[position, batch] for position, batch in self._drawn]

    def restore(self, held: list[Any], device: torch.device) -> bool:
        """Write the batches a checkpoint's loop held into those the loop holds now, in place; the rest
        (a resume) are handed back by the next draws, moved to `device`. False when they did not fit."""
        saved = deque((int(position), batch) for position, batch in held)
        now, self._drawn = list(self._drawn), deque()
        exact = True
        for _, batch in now:
            if saved and copy_into(batch, saved[0][1]):
                self._drawn.append((saved[0][0], batch))
                saved.popleft()
            else:
                exact = False
        self._replay = deque((position, batch_to(batch, device)) for position, batch in saved)
        return exact

    def put_first(self, batches: list[tuple[int, Any]], device: torch.device) -> bool:
        """Hand `batches` out next, ahead of those the loop holds (a probe step's): written into the
        held ones in place, the rest by the next draws, then the held ones' own contents (copies).
        False, with nothing changed, when a held batch is of another shape or structure."""
        order = [[position, batch] for position, batch in batches]
        order += [[position, batch_to(batch, device, copy=True)] for position, batch in self._drawn]
        if not all(copy_into(held, new, write=False) for (_, held), (_, new) in zip(self._drawn, order)):
            return False
        later = list(self._replay)
        self.restore(order, device)
        self._replay.extend(later)
        return True

    def clear(self) -> None:
        self._drawn.clear()
        self._replay.clear()
