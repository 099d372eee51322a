"""Batched statistics of parameters, gradients and optimizer state: pure torch, no host syncs.

Every function takes lists of tensors that share one device and dtype (a "bucket") and returns
stacked float32 vectors on that device, one value per tensor, computed with `torch._foreach_*`
ops so the cost is a handful of kernel launches whatever the number of tensors. Functions that need
elementwise temporaries work through `Chunks`, which bounds the temporaries to a fixed number of
elements by splitting large tensors into flat views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CLIP_EPS",
    "Chunks",
    "norms",
    "max_abs",
    "maxes",
    "sums",
    "nonfinite_counts",
    "clip_coefficient",
    "count_positive",
    "square_sums",
]

#: Added to the total norm before dividing, exactly as `torch.nn.utils.clip_grad_norm_` does.
CLIP_EPS = 1e-6


class Chunks:
    """Splits a fixed list of tensor sizes into batches of flat pieces of at most `budget` elements.

    Temporaries made for one batch then never exceed `budget` elements, however large a single
    tensor is. Per-piece results are folded back to per-tensor values with `fold_sum`.

    Args:
        numels: Element counts of the tensors, in order.
        budget: Most elements of one batch.

    Example:
        >>> chunks = Chunks([10, 3], budget=4)
        >>> [[(i, a, b) for i, a, b in batch] for batch in chunks.batches]
        [[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 10), (1, 0, 2)], [(1, 2, 3)]]
    """

    def __init__(self, numels: Sequence[int], budget: int) -> None:
        if budget < 1:
            raise ValueError(f"Chunks: budget must be >= 1, got {budget}")
        self.numels = [int(n) for n in numels]
        self.budget = budget
        self.batches: list[list[tuple[int, int, int]]] = [[]]
        room = budget
        for i, n in enumerate(self.numels):
            start = 0
            while start < n or (n == 0 and start == 0):
                if room == 0:
                    self.batches.append([])
                    room = budget
                stop = min(n, start + room)
                self.batches[-1].append((i, start, stop))
                room -= stop - start
                start = stop
                if n == 0:
                    break
        self.batches = [b for b in self.batches if b]
        owners = [i for batch in self.batches for i, _, _ in batch]
        self.split = len(owners) != len(self.numels)
        self._whole = [[a == 0 and b == self.numels[i] for i, a, b in batch] for batch in self.batches]
        self._owner: dict[torch.device, Tensor] = {}
        self._owners = owners

    def views(self, batch: int, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The pieces of batch `batch` cut from `tensors` (views; whole tensors stay unreshaped)."""
        return [
            tensors[i] if whole else tensors[i].reshape(-1)[a:b]
            for (i, a, b), whole in zip(self.batches[batch], self._whole[batch])
        ]

    def fold_sum(self, pieces: Tensor) -> Tensor:
        """Per-tensor sums of per-piece values: `(pieces,)` -> `(tensors,)`."""
        if not self.split:
            return pieces
        owner = self._owner.get(pieces.device)
        if owner is None:
            owner = self._owner[pieces.device] = torch.tensor(self._owners, device=pieces.device)
        return torch.zeros(len(self.numels), dtype=pieces.dtype, device=pieces.device).index_add_(0, owner, pieces)

    def fold_max(self, pieces: Tensor) -> Tensor:
        """Per-tensor maxima of per-piece values (NaN wins, as in torch.max)."""
        if not self.split:
            return pieces
        owner = self._owner.get(pieces.device)
        if owner is None:
            owner = self._owner[pieces.device] = torch.tensor(self._owners, device=pieces.device)
        out = torch.full((len(self.numels),), -math.inf, dtype=pieces.dtype, device=pieces.device)
        out = out.scatter_reduce(0, owner, pieces, reduce="amax")
        # scatter_reduce's amax may drop NaN; a tensor with a NaN piece has a NaN maximum.
        nan = torch.zeros(len(self.numels), dtype=pieces.dtype, device=pieces.device)
        nan.index_add_(0, owner, pieces.isnan().to(pieces.dtype))
        return torch.where(nan > 0, math.nan, out)


def norms(tensors: Sequence[Tensor], ord: float = 2.0) -> Tensor:
    """Per-tensor vector norm (`ord` 2, 1 or inf) as a float32 vector, accumulated in float32."""
    return torch.stack(torch._foreach_norm(list(tensors), ord, dtype=torch.float32))


# torch's CPU `_foreach_norm` is fast only for ord=2 (ord inf is ~14x slower, ord 0/1 ~5x slower on
# the benchmark model): on CPU the functions below use other kernels; elsewhere the fused norms.
_HAS_MAX = hasattr(torch, "_foreach_max")  # torch >= 2.6
_HAS_POWSUM = hasattr(torch, "_foreach_powsum")


def _fast_cpu(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and tensors[0].device.type == "cpu" and _HAS_MAX


def max_abs(tensors: Sequence[Tensor], chunks: Chunks) -> Tensor:
    """Per-tensor max |x| as a float32 vector (NaN if the tensor holds a NaN)."""
    if not _fast_cpu(tensors):
        return norms(tensors, math.inf)
    # max |x| = max(max x, -min x): one read per tensor and no |x| temporary (aminmax keeps NaN).
    extremes: list[Tensor] = []
    for b in range(len(chunks.batches)):
        for t in chunks.views(b, tensors):
            extremes += torch.aminmax(t) if t.numel() else (t.new_zeros(()), t.new_zeros(()))
    both = torch.stack(extremes).view(-1, 2)  # (pieces, [min, max])
    pieces = torch.maximum(both[:, 1], both[:, 0].neg())
    return chunks.fold_max(pieces.float())


def maxes(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor maximum of non-negative tensors (e.g. Adam's `exp_avg_sq`), float32."""
    if not _HAS_MAX:
        return norms(tensors, math.inf)
    return torch.stack(torch._foreach_max(list(tensors))).float()


def sums(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor sum of non-negative tensors (their L1 norm), accumulated in float32."""
    if _fast_cpu(tensors):
        return torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    return norms(tensors, 1.0)


def square_sums(tensors: list[Tensor]) -> list[Tensor]:
    """Sum of squares of each tensor (float32 scalars)."""
    if _HAS_POWSUM:
        return list(torch._foreach_powsum(tensors, 2))
    return [n.square() for n in torch._foreach_norm(tensors, 2, dtype=torch.float32)]


def count_positive(tensors: list[Tensor]) -> list[Tensor]:
    """Number of elements > 0 of each tensor (NaN counts), overwriting `tensors`."""
    torch._foreach_clamp_min_(tensors, 0.0)  # (0, inf] and NaN stay nonzero
    torch._foreach_sign_(tensors)  # 0, 1 or NaN
    return square_sums(tensors)  # sum of squares of 0/1: the count


def nonfinite_counts(tensors: Sequence[Tensor], chunks: Chunks, l2: Tensor | None = None) -> Tensor:
    """Number of NaN/inf elements of each tensor, as a float32 vector.

    With `l2` (the tensors' L2 norms, already computed) the count is only computed for tensors whose
    norm is not finite: a finite norm proves every element finite. That shortcut reads `l2` on the
    host, so use it only where reading is free (CPU); on an accelerator leave `l2` out and every
    tensor is counted on the device.
    """
    if l2 is not None:
        counts = torch.zeros(len(tensors), dtype=torch.float32, device=l2.device)
        if not math.isfinite(float(l2.sum())):  # finite norms, finite sum: nothing to count
            for i in torch.isfinite(l2).logical_not_().nonzero().flatten().tolist():
                counts[i] = torch.isfinite(tensors[i]).logical_not_().sum()
        return counts
    pieces = []
    for b in range(len(chunks.batches)):
        zeros = torch._foreach_mul(chunks.views(b, tensors), 0.0)  # 0 where finite, NaN elsewhere
        pieces.extend(torch._foreach_norm(zeros, 0, dtype=torch.float32))  # ord 0 counts nonzeros
    return chunks.fold_sum(torch.stack(pieces))


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """`clip_grad_norm_`'s factor: `min(1, max_norm / (total_norm + 1e-6))`, as a device tensor."""
    return torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
