"""What a guard checkpoint may hold: a buffer non-finite by design, numpy scalars, nothing unloadable."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import spikedoc
from spikedoc.guard import CheckpointError
from spikedoc.guard.checkpoint import CheckpointStore, host_copy
from spikedoc.guard.payload import buffer_patterns
from tests.common.guarded import MaskedLM, build, nan_grads, run_guarded


def _masked_parts():
    model = MaskedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))


def _state(model, opt) -> dict:
    return {**host_copy({"model": model.state_dict(), "optimizer": opt.state_dict()}), "guard": {}, "data": {}, "rng": {}}


def _events(run_dir, kind):
    events = spikedoc.load(run_dir).events
    return events.loc[events["kind"] == kind]


def test_a_model_with_a_minus_inf_mask_buffer_is_checkpointed_and_rolled_back(tmp_path):
    model, opt, sched = _masked_parts()
    mask = model.mask.clone()
    assert torch.isneginf(mask).any()  # non-finite by design
    guard, _ = run_guarded(tmp_path, steps=40, parts=(model, opt, sched), checkpoint_every=10,
                           after_backward=nan_grads(set(range(25, 30))))  # fmt: skip
    rollback = next(a for a in guard.actions if a["kind"] == "rollback")
    assert rollback["to_step"] == 20 and guard.step == 40
    assert _events(tmp_path, "checkpoint_failed").empty
    assert torch.equal(model.mask, mask)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_buffer_that_became_non_finite_is_refused_and_named(tmp_path):
    model, opt, _ = _masked_parts()
    store = CheckpointStore(tmp_path, keep=3, buffers=buffer_patterns(model))
    store.save(0, _state(model, opt), healthy=True)  # -inf where the mask started with it: fine
    model.mask[5, 0] = math.nan  # below the diagonal: finite at the start
    with pytest.raises(CheckpointError, match=r"NaN or inf .*\(model\.mask\)"):
        store.save(10, _state(model, opt), healthy=True)


def test_a_parameter_is_never_allowed_non_finite_even_with_buffers_allowed(tmp_path):
    model, opt, _ = _masked_parts()
    store = CheckpointStore(tmp_path, keep=3, buffers=buffer_patterns(model))
    with torch.no_grad():
        model.head.bias[0] = -math.inf
    with pytest.raises(CheckpointError, match=r"model\.head\.bias"):
        store.save(10, _state(model, opt), healthy=True)


def test_numpy_scalars_from_a_lambda_lr_are_stored_as_numbers_with_one_warning(tmp_path):
    model, opt, _ = build()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: np.float64(min(1.0, (s + 1) / 20)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, _ = run_guarded(tmp_path, steps=40, parts=(model, opt, sched), checkpoint_every=10,
                               after_backward=nan_grads(set(range(25, 30))))  # fmt: skip
    told = [w for w in caught if "numpy scalars" in str(w.message)]
    assert len(told) == 1 and "optimizer.param_groups.0.lr" in str(told[0].message)
    assert any(a["kind"] == "rollback" and a["to_step"] == 20 for a in guard.actions)
    for path in (tmp_path / "checkpoints").glob("step-*.pt"):
        payload = torch.load(path, weights_only=True)
        assert type(payload["optimizer"]["param_groups"][0]["lr"]) is float


class _Tag:
    """An object the weights-only unpickler does not rebuild."""


def test_a_state_that_could_never_load_is_one_warning_naming_the_entry_and_no_rollback_target(tmp_path):
    model, opt, sched = build()
    opt.param_groups[0]["tag"] = _Tag()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard, _ = run_guarded(tmp_path, steps=30, parts=(model, opt, sched), checkpoint_every=10)
    told = [w for w in caught if "weights_only" in str(w.message)]
    assert len(told) == 1 and "optimizer.param_groups.0.tag (_Tag)" in str(told[0].message)
    assert guard.step == 30 and not list((tmp_path / "checkpoints").glob("step-*.pt"))
    assert len(_events(tmp_path, "checkpoint_failed")) == 4  # steps 0, 10, 20, 30: each recorded
