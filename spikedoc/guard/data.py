"""DataStream: the batches of any data source in a reproducible order, with a position to return to.

Four kinds of source, each positioned before the guard restores the random generators (so that a
source drawing from the global RNG draws the same batches again):

- a loader with `state_dict`/`load_state_dict` (torchdata's `StatefulDataLoader`): its own state is
  saved and restored;
- a `torch.utils.data.DataLoader` or any other re-iterable (a list, a dataset with `__iter__`): the
  random generators that decide its order are saved at the start of each epoch (the global ones,
  and a DataLoader's own: a shuffling one without a generator gets a seeded one the stream owns; a
  sampler with `set_epoch` is told the epoch); a rewind restores them, iterates again and
  fast-forwards through the epoch's first batches (which loads them);
- a callable (nanoGPT's `get_batch(split)`, random offsets from the global RNG): called with the
  loop's arguments; its position is the number of draws, and the replay is exact because the
  guard restores the RNG the draws come from;
- a one-shot iterator or generator: it cannot be rewound, so the replay continues where it is;
  exact for a stream that draws lazily from the restored RNG, not for a fixed sequence.

For the last two, skipping a position means drawing a fresh batch in its place.

Whatever the kind, a batch handed out again at a position is compared with the one first handed out
there (by content hash, on the device, read only on a replay): a source whose replay differs (a
shuffle buffer refilled on resume, a sampler drawing from its own unseeded RNG) is said to be
inexact, once, rather than trusted.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from spikedoc.guard.rng import rng_state, set_rng_state
from spikedoc.monitor.fingerprint import batch_hash, samples_in

__all__ = ["DataStream", "copy_into", "batch_to"]

# Batches whose hash is kept to check a replay: a rollback never goes back further than this many
# draws in any run whose checkpoints are a few thousand micro-batches apart.
_KEPT_HASHES = 1 << 14


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

    def __init__(self, data: Any, *, seed: int, epochs: int) -> None:
        self.kind = _kind(data)
        self.data, self.epochs = data, epochs
        self.skip: set[int] = set()
        """Positions never yielded (batches a rollback skips)."""
        self.epoch = self.index = self.position = 0
        self.skipped_samples = 0
        """Samples in the batches the last `next()` drew and skipped on the way to the one it returned."""
        self._iterator: Iterator[Any] | None = iter(data) if self.kind == "iterator" else None
        # position -> (the call's arguments, hash of the batch first handed out there)
        self._hashes: OrderedDict[int, tuple[str, Tensor]] = OrderedDict()
        self.inexact_at: int | None = None
        """The first position whose replayed batch differed from the original (None: none seen)."""
        self._generators = _order_generators(data, seed) if self.kind == "reiterable" else []
        self._epoch_start: list[torch.Tensor] = []
        self._epoch_rng: dict[str, Any] | None = None

    @property
    def exact(self) -> bool:
        """Whether a rewind is known to return the same batches (a one-shot iterator's is not)."""
        return self.kind != "iterator"

    def next(self, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        """The next batch not skipped, with its position; StopIteration after the last epoch.
        Arguments are passed to a callable source (nanoGPT's `get_batch("train")`)."""
        if (args or kwargs) and self.kind != "callable":
            raise TypeError(f"Guard: only a callable data source takes arguments; data is a {type(self.data).__name__}")
        self.skipped_samples = 0
        while True:
            if self.kind == "callable":
                batch = self.data(*args, **kwargs)
            else:
                if self._iterator is None:
                    if self.epoch >= self.epochs or self.kind == "iterator":
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
                self._check_replay(position, batch, (args, kwargs))
                return position, batch
            self.skipped_samples += samples_in(batch)

    def skip_positions(self, positions: Iterable[int]) -> None:
        """Never hand out these positions again. A function or an iterator draws fresh batches in
        their place, so the replay's later draws fall otherwise among the loop's own uses of the
        random generators (an evaluation's draws): their batches are new, not compared with the old."""
        new = {int(position) for position in positions} - self.skip
        self.skip |= new
        if new and self.kind in ("callable", "iterator"):
            for position in [kept for kept in self._hashes if kept >= min(new)]:
                del self._hashes[position]

    def _check_replay(self, position: int, batch: Any, call: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        """Keep the batch's hash; on a replay of its position, compare (one host read per replayed batch).

        A function's draw at a position is the same draw only with the same arguments (skipping a
        batch shifts a loop's evaluation draws, `get_batch("val")`, onto other positions); the draws
        after a skipped position are forgotten by `skip_positions`. A one-shot iterator is not
        checked: the guard says at its first rewind that it cannot be rewound.
        """
        if self.kind == "iterator" or self.inexact_at is not None:
            return
        try:
            new = batch_hash(batch)
        except Exception:  # noqa: BLE001 - a batch the hash cannot read is not checked
            return
        if new is None:
            return
        key = repr(call) if self.kind == "callable" else ""
        old = self._hashes.get(position)
        if old is None or old[0] != key:
            self._hashes[position] = (key, new)
            self._hashes.move_to_end(position)
            if len(self._hashes) > _KEPT_HASHES:
                self._hashes.popitem(last=False)
        elif bool(old[1].to(new.device) != new):
            self.inexact_at = position
            warnings.warn(
                f"Guard: the batch replayed at data position {position} differs from the one first drawn there: "
                f"this {type(self.data).__name__} does not replay exactly (a shuffle buffer refilled on resume? a "
                "sampler with its own unseeded random generator?); replayed steps train on other batches",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, as tensors and plain types (the skip set is the guard's, not saved here)."""
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index, "position": self.position,
                                 "generators": [g.clone() for g in self._epoch_start], "rng": self._epoch_rng}  # fmt: skip
        if self.kind == "stateful":
            state["loader"] = self.data.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to a saved position: the next batch is the one that followed it then. Uses the
        random generators (a re-iterable's fast-forward): restore theirs after this, not before."""
        try:
            self.epoch, self.index, self.position = int(state["epoch"]), int(state["index"]), int(state["position"])
            generators = list(state["generators"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint holds a malformed data position ({exc!r})") from exc
        if self.kind in ("callable", "iterator"):
            return  # no position but the count: the restored RNG decides what is drawn next
        self._iterator = None
        if self.kind == "stateful":
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
        self._epoch_rng = state.get("rng")
        if self._epoch_rng is not None:  # an order drawn from the global RNG when the epoch began
            set_rng_state(self._epoch_rng)
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
        # A re-iterable may draw its order from the global RNG when iterated (a shuffling iterable
        # dataset): its state at the epoch's start replays that order.
        self._epoch_rng = rng_state() if self.kind == "reiterable" else None
        self._set_epoch()
        self._iterator = iter(self.data)

    def _set_epoch(self) -> None:
        sampler = getattr(self.data, "sampler", None)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(self.epoch)


def _kind(data: Any) -> str:
    if callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None)):
        return "stateful"
    if isinstance(data, Iterator):
        return "iterator"
    if isinstance(data, Iterable):
        return "reiterable"
    if callable(data):
        return "callable"
    raise ValueError(f"Guard: data must be a loader, an iterable, an iterator or a function returning a batch; "
                     f"got {type(data).__name__}")


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


def copy_into(dst: Any, src: Any, *, write: bool = True) -> bool:
    """Copy a batch into one of the same structure, tensor by tensor in place; False if they differ
    (`write=False`: only whether they would fit, nothing written)."""
    if isinstance(dst, Tensor):
        if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            return False
        if write:
            dst.copy_(src)
        return True
    if isinstance(dst, dict) and isinstance(src, dict) and dst.keys() == src.keys():
        return all(copy_into(dst[k], src[k], write=write) for k in dst)
    if isinstance(dst, (list, tuple)) and isinstance(src, (list, tuple)) and len(dst) == len(src):
        return all(copy_into(a, b, write=write) for a, b in zip(dst, src))
    try:
        return bool(dst == src)  # a plain value (a sample id): nothing to write, the same or not
    except (TypeError, ValueError):
        return False


def batch_to(batch: Any, device: torch.device, *, copy: bool = False) -> Any:
    """A batch with every tensor moved to `device` (the structure kept; `copy`: new tensors even where already there)."""
    if isinstance(batch, Tensor):
        return batch.to(device, copy=copy)
    if isinstance(batch, dict):
        return {k: batch_to(v, device, copy=copy) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(v, device, copy=copy) for v in batch)
    return batch
