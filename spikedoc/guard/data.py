"""DataStream: the batches of a loader in a reproducible order, with a position to save and return to.

Three kinds of data, from fastest rewind to slowest:

- a loader with `state_dict`/`load_state_dict` (torchdata's `StatefulDataLoader`): its own state is
  saved and restored;
- a `torch.utils.data.DataLoader`: the random generators that decide its order (the sampler's and
  the loader's) are saved at the start of each epoch, a shuffling loader without one gets a seeded
  generator the stream owns, a sampler with `set_epoch` (DistributedSampler) is told the epoch; a
  rewind restores them and fast-forwards through the epoch's first batches (which loads them);
- any other re-iterable (a list, a dataset object with `__iter__`): iterated again and fast-forwarded.

A one-shot iterator cannot be replayed and is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from spikedoc.monitor.fingerprint import samples_in

__all__ = ["DataStream"]


class DataStream:
    """Batches of `data`, numbered by `position` (batches drawn since the start, skipped ones included).

    Args:
        data: The loader or re-iterable of batches.
        seed: Seed of the generator given to a shuffling DataLoader that has none.
        epochs: Passes over `data` before the stream ends.

    Example:
        >>> stream = DataStream([10, 11, 12, 13], seed=0, epochs=1)
        >>> stream.skip.add(1); [stream.next() for _ in range(3)]
        [(0, 10), (2, 12), (3, 13)]
    """

    def __init__(self, data: Iterable[Any], *, seed: int, epochs: int) -> None:
        if isinstance(data, Iterator) or not isinstance(data, Iterable):
            raise ValueError(
                f"Guard: data must be re-iterable (a DataLoader, a list, a dataset), got {type(data).__name__}: "
                "a one-shot iterator or generator cannot be replayed after a rollback"
            )
        self.data, self.epochs = data, epochs
        self.skip: set[int] = set()
        """Positions never yielded (batches a rollback skips)."""
        self.epoch = self.index = self.position = 0
        self.skipped_samples = 0
        """Samples in the batches the last `next()` drew and skipped on the way to the one it returned."""
        self._iterator: Iterator[Any] | None = None
        self._stateful = callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None))
        self._generators = [] if self._stateful else _order_generators(data, seed)
        self._epoch_start: list[torch.Tensor] = []

    def next(self) -> tuple[int, Any]:
        """The next batch not skipped, with its position; StopIteration after the last epoch."""
        self.skipped_samples = 0
        while True:
            if self._iterator is None:
                if self.epoch >= self.epochs:
                    raise StopIteration
                self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                self.index = 0
                continue
            position = self.position
            self.index += 1
            self.position += 1
            if position not in self.skip:
                return position, batch
            self.skipped_samples += samples_in(batch)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as tensors and plain types (the skip set is the guard's, not saved here)."""
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index, "position": self.position,
                                 "generators": [g.clone() for g in self._epoch_start]}  # fmt: skip
        if self._stateful:
            state["loader"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to a saved position: the next batch is the one that followed it then."""
        try:
            self.epoch, self.index, self.position = int(state["epoch"]), int(state["index"]), int(state["position"])
            generators = list(state["generators"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint holds a malformed data position ({exc!r})") from exc
        self._iterator = None
        if self._stateful:
            self.data.load_state_dict(state["loader"])
            self._iterator = iter(self.data)
            return
        if self.index == 0:
            return  # at an epoch boundary: the next epoch starts afresh
        if len(generators) != len(self._generators):
            raise ValueError("checkpoint's data position was saved for a loader with other random generators")
        for gen, saved in zip(self._generators, generators):
            gen.set_state(saved)
        self._epoch_start = [g.clone() for g in generators]
        self._set_epoch()
        self._iterator = iter(self.data)
        for _ in range(self.index):  # fast-forward: the order is the saved epoch's again
            try:
                next(self._iterator)
            except StopIteration as exc:
                raise ValueError(f"data has fewer than {self.index} batches in epoch {self.epoch}: not the data "
                                 "this checkpoint was taken with") from exc  # fmt: skip

    def _start_epoch(self) -> None:
        self._epoch_start = [g.get_state() for g in self._generators]
        self._set_epoch()
        self._iterator = iter(self.data)

    def _set_epoch(self) -> None:
        sampler = getattr(self.data, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)


def _order_generators(data: Any, seed: int) -> list[torch.Generator]:
    """The generators that decide a DataLoader's order; a shuffling one without any gets a seeded one."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return []
    sampler = data.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        sampler.generator = data.generator if data.generator is not None else torch.Generator().manual_seed(seed)
    if data.generator is None:  # the workers' base seed is drawn from it (else from the global RNG)
        data.generator = getattr(sampler, "generator", None) or torch.Generator().manual_seed(seed)
    found: list[torch.Generator] = []
    for gen in (data.generator, getattr(sampler, "generator", None),
                getattr(getattr(data, "batch_sampler", None), "generator", None)):  # fmt: skip
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found
