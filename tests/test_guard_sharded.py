"""The pieces of the guard under FSDP2 that run on one process: clipping shards by an agreed norm,
and a rank's share of the squared global norm."""

from __future__ import annotations

import pytest
import torch

from spikedoc.guard.sharded import GlobalNorm, clip_shards
from tests.common.models import char_text, make_model


def _grads(seed: int) -> torch.nn.Module:
    net = make_model(seed)
    ids, labels = char_text().batch(seed)
    net(ids, labels=labels).loss.backward()
    return net


def test_clip_shards_scales_as_clip_grad_norm_given_the_same_norm():
    ours, theirs = _grads(0), _grads(0)
    total = float(torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1))
    clip_shards(list(ours.parameters()), total, 0.1)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours.parameters(), theirs.parameters()))


def test_clip_shards_leaves_gradients_below_the_max_norm_alone():
    net = _grads(1)
    before = [p.grad.clone() for p in net.parameters()]
    assert clip_shards(list(net.parameters()), 0.5, 1.0) == 1.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))


def test_replicated_tensors_count_once_rank_0s():
    params = list(_grads(2).parameters())  # no DTensor: every tensor is replicated
    norms = torch.stack([p.grad.norm() for p in params])
    whole = float(norms.square().sum())
    assert float(GlobalNorm(rank=0).share(norms, params)) == pytest.approx(whole, rel=1e-6)
    assert float(GlobalNorm(rank=1).share(norms, params)) == 0.0
