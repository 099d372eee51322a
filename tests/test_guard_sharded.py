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


def test_training_on_after_a_restore_leaves_the_kept_state_as_it_was_saved():
    # On one device the optimizer would keep the very tensors it is given: a second rollback to the
    # in-memory checkpoint would then restore what training had written into them since.
    import copy

    from spikedoc.guard.checkpoint import host_copy
    from spikedoc.guard.sharded import load_training_state, training_state
    from tests.common.models import make_model

    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 16))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    kept = host_copy(training_state(model, opt))
    saved = copy.deepcopy(kept)
    load_training_state(model, opt, kept)
    step()
    for key, tensors in saved["optimizer"]["state"].items():
        for name, tensor in tensors.items():
            assert torch.equal(kept["optimizer"]["state"][key][name], tensor), (key, name)
