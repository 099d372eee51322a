"""What the ranks of a watched distributed run agree on: the segment number and full-tensor statistics of sharded tensors."""

from __future__ import annotations

import torch

from spikedoc.monitor.meta import distributed_rank

__all__ = ["Ranks"]


class Ranks:
    """The monitor's view of torch.distributed, with a gloo process group of its own.

    The monitor's collectives run on their own group, so they never interleave with the training's
    (FSDP's all-gathers, DDP's all-reduces) whatever thread or moment they run at; gloo works on
    CPU tensors under any default backend, and the values it reduces are a few numbers per tensor.

    Example:
        >>> Ranks().world   # not distributed
        1
    """

    def __init__(self) -> None:
        self.rank, self.world = distributed_rank()
        self.group = torch.distributed.new_group(backend="gloo") if self.world > 1 else None

    def max_int(self, value: int) -> int:
        """The largest `value` over ranks (the value itself when not distributed)."""
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return int(t.item())
