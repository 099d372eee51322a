"""Update norms for optimizers without an exact formula, from a bounded snapshot of the parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SampledSnapshot"]


class SampledSnapshot:
    """Update norms of any optimizer from a bounded copy of the parameters taken before the step.

    Tensors of at most `exact_below` elements are copied whole (exact). Larger ones keep a fixed
    stratified random sample of elements (one per equal stretch of the flattened tensor), sized so
    that all samples together hold about `budget` elements and each tensor at least `min_sample`;
    their update norm is estimated as `sqrt(numel / k * sum(sample_diff ** 2))`.

    Args:
        params: The parameters (fixes sizes, device and dtype).
        budget: Elements to keep in total (copies of small tensors count against it).
        exact_below: Largest tensor copied whole.
        min_sample: Fewest elements sampled from a large tensor.
        seed: Seed of the sample positions (fixed, so every step samples the same elements).

    Example:
        >>> p = [torch.zeros(10), torch.zeros(10_000)]
        >>> snap = SampledSnapshot(p, budget=200, exact_below=64, min_sample=100)
        >>> before = snap.take(p)
        >>> p[1] += 1.0
        >>> snap.update_norms(p, before).round()
        tensor([  0., 100.])
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        budget: int,
        exact_below: int = 4096,
        min_sample: int = 1024,
        seed: int = 0,
    ) -> None:
        numels = [p.numel() for p in params]
        exact = [i for i, n in enumerate(numels) if n <= exact_below]
        large = [i for i, n in enumerate(numels) if n > exact_below]
        room = max(budget - sum(numels[i] for i in exact), 0)
        total_large = sum(numels[i] for i in large)
        frac = min(1.0, room / total_large) if total_large else 0.0
        self.exact = exact
        self.sampled: list[int] = []
        self.index: list[Tensor] = []
        self.scale: list[float] = []
        gen = torch.Generator().manual_seed(seed)
        for i in large:
            n = numels[i]
            k = max(min(n, min_sample), math.ceil(frac * n))
            if k >= n:
                self.exact.append(i)
                continue
            bounds = torch.arange(k + 1, dtype=torch.float64) * (n / k)  # k equal strata of [0, n)
            lo, width = bounds[:-1].floor(), bounds[1:].floor() - bounds[:-1].floor()
            pos = (lo + (torch.rand(k, generator=gen, dtype=torch.float64) * width).floor()).long()
            self.sampled.append(i)
            self.index.append(pos.to(params[i].device))
            self.scale.append(math.sqrt(n / k))
        self.exact.sort()
        self.kept = sum(numels[i] for i in self.exact) + sum(len(ix) for ix in self.index)

    def take(self, params: Sequence[Tensor]) -> list[Tensor]:
        """Copy the kept elements of `params` (call before the step)."""
        kept = list(torch._foreach_mul([params[i].detach() for i in self.exact], 1.0)) if self.exact else []
        kept += [params[i].detach().reshape(-1).index_select(0, ix) for i, ix in zip(self.sampled, self.index)]
        return kept

    def update_norms(self, params: Sequence[Tensor], before: list[Tensor]) -> Tensor:
        """Per-tensor update norms (exact or estimated) of `params` now against `before`."""
        now = [params[i].detach() for i in self.exact]
        now += [params[i].detach().reshape(-1).index_select(0, ix) for i, ix in zip(self.sampled, self.index)]
        diff = torch._foreach_sub(now, before)
        got = torch._foreach_norm(diff, 2, dtype=torch.float32)
        got = torch._foreach_mul(list(got), [1.0] * len(self.exact) + self.scale)
        out: list[Tensor | None] = [None] * (len(self.exact) + len(self.sampled))
        for i, n in zip(self.exact + self.sampled, got):
            out[i] = n
        return torch.stack(out)  # type: ignore[arg-type]
