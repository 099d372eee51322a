"""What the ranks of a watched distributed run combine: full-tensor statistics of sharded tensors, and integrations' stop decisions.

Under FSDP2 (`fully_shard`) parameters, gradients and optimizer state are DTensors holding one
shard per rank. The monitor computes every statistic on the local shards, as for any tensor, and
combines them per tensor into the statistics of the full tensor when it turns a step into rows:
norms as the square root of the summed squares, counts and sums summed, maxima maxed. All of a
step's values travel in one `all_gather` of one float64 vector on the monitor's own gloo group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spikedoc.monitor.meta import distributed_rank

__all__ = ["Ranks", "agreed_segment", "local", "is_sharded", "LocalState", "NORM_KEYS", "SUM_KEYS", "MAX_KEYS"]

#: Per-tensor values combined over shards as sqrt(sum of squares), as sums, as maxima.
NORM_KEYS = ("grad_norm", "param_norm_before", "param_norm", "update_norm", "exp_avg_norm", "momentum_norm")
SUM_KEYS = ("nonfinite", "above_eps", "exp_avg_sq_sum")
MAX_KEYS = ("grad_max", "exp_avg_sq_max")
_KEYS = NORM_KEYS + SUM_KEYS + MAX_KEYS


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed tensors
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def local(t: Any) -> Any:
    """The local shard of a DTensor; any other value as it is."""
    if _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t._local_tensor
    return t


def is_sharded(t: Any) -> bool:
    """Whether `t` is a DTensor split over ranks (a `Shard` placement), so that its local part is not all of it."""
    if _DTENSOR is None or not isinstance(t, _DTENSOR):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) for p in t.placements)


_opens: dict[str, int] = {}


def agreed_segment(run_dir: str, candidate: Callable[[], int]) -> int | None:
    """The segment number every rank uses for this `watch()` of `run_dir`: the first rank to ask decides.

    Rank 0 writes `meta.json` while the others read it, so each rank's own count could differ. The
    first rank to open counts (`candidate()`, before any rank of this round has written) and puts
    the number in torch.distributed's store with a compare-and-set; the others read it. Nobody
    waits for another rank, so monitors may be opened in any order (the guard opens rank 0's
    last). None when not distributed or when the store is unavailable (each rank then counts).
    """
    if distributed_rank()[1] == 1:
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it each rank counts
        return None
    # The n-th watch() of this run dir in this process: the same n on every rank.
    _opens[run_dir] = n = _opens.get(run_dir, 0) + 1
    return int(store.compare_set(f"spikedoc/segment/{run_dir}/{n}", "", str(candidate())))


class LocalState(Mapping):
    """An optimizer's `state`, keyed by the parameters' local shards, holding local shards.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> LocalState({p: {"exp_avg": torch.zeros(2)}}, {id(p): p})[p]["exp_avg"].tolist()
        [0.0, 0.0]
    """

    def __init__(self, state: Mapping, owners: dict[int, Tensor]) -> None:
        self._state, self._owners = state, owners

    def __getitem__(self, key: Tensor) -> dict[str, Any]:
        owner = self._owners.get(id(key), key)
        if owner not in self._state:  # never index: an optimizer's state is a defaultdict that would insert
            raise KeyError(key)
        return {k: local(v) for k, v in self._state[owner].items()}

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)

    def __contains__(self, key: object) -> bool:
        return self._owners.get(id(key), key) in self._state


class Ranks:
    """The monitor's view of torch.distributed, with a gloo process group of its own.

    The monitor's collectives run on their own group, so they never interleave with the training's
    (FSDP's all-gathers, DDP's all-reduces); gloo works on CPU tensors under any default backend,
    and the values exchanged are a few numbers per tensor.

    Example:
        >>> Ranks().world   # not distributed
        1
    """

    def __init__(self) -> None:
        self.rank, self.world = distributed_rank()
        self._group: Any = None

    @property
    def group(self) -> Any:
        """The gloo group, created at its first use (a collective: every rank uses it at the same point).

        Not at construction: `watch()` itself must not wait for the other ranks, since callers may
        open their monitors one rank after another (the guard opens rank 0's last).
        """
        if self._group is None and self.world > 1:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks (the value itself when not distributed). A collective."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def combine(self, values: dict[str, np.ndarray] | None, sharded: list[np.ndarray]) -> dict[str, np.ndarray] | None:
        """Per-tensor statistics of the full tensors from every rank's local ones: one collective.

        Every rank must call this for every recorded step, in the same order, also when its own
        step was lost (`values` None): the layout is fixed by the plan, so the vectors always match.

        Args:
            values: this rank's landed values (`"<bucket>:<key>"` per-tensor vectors), or None.
            sharded: per bucket, a boolean mask of the tensors that are split over ranks; the others
                are replicated and keep rank 0's value.

        Returns:
            `values` with the per-tensor keys combined (a key missing on any rank is dropped), or
            None when any rank lost the step.
        """
        sizes = [len(m) for m in sharded]
        width = sum(sizes) * len(_KEYS)
        mine = np.zeros(1 + len(sizes) * len(_KEYS) + width)
        mine[0] = values is not None
        present = mine[1 : 1 + len(sizes) * len(_KEYS)]
        body = mine[1 + len(sizes) * len(_KEYS) :]
        offset = 0
        for b, mask in enumerate(sharded):
            for k, key in enumerate(_KEYS):
                part = body[offset : offset + len(mask)]
                offset += len(mask)
                v = None if values is None else values.get(f"{b}:{key}")
                if v is None:
                    continue
                present[b * len(_KEYS) + k] = 1
                contribution = np.asarray(v, dtype=np.float64).reshape(-1) ** (2 if key in NORM_KEYS else 1)
                # Replicated tensors: rank 0's value alone (others add 0, or -inf to a maximum).
                neutral = -np.inf if key in MAX_KEYS else 0.0
                part[:] = contribution if self.rank == 0 else np.where(mask, contribution, neutral)
        gathered = [torch.empty(len(mine), dtype=torch.float64) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, torch.from_numpy(mine), group=self.group)
        every = torch.stack(gathered).numpy()  # (world, 1 + flags + width)
        if values is None or every[:, 0].min() == 0:
            return None
        flags = every[:, 1 : 1 + len(sizes) * len(_KEYS)].min(axis=0)
        parts = every[:, 1 + len(sizes) * len(_KEYS) :]
        out = dict(values)
        offset = 0
        for b, mask in enumerate(sharded):
            for k, key in enumerate(_KEYS):
                block = parts[:, offset : offset + len(mask)]
                offset += len(mask)
                name = f"{b}:{key}"
                if name not in out:
                    continue
                if not flags[b * len(_KEYS) + k]:
                    del out[name]
                elif key in MAX_KEYS:
                    out[name] = block.max(axis=0)
                else:
                    total = block.sum(axis=0)
                    out[name] = np.sqrt(total) if key in NORM_KEYS else total
        return out
