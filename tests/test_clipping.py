"""Specification of how watch() sees the loop's own gradient clipping (spikedoc/monitor/clipping.py).

The loop clips with torch's own functions, as people write it; the recorded `grad_norm` is the
norm before that clipping, `clip_coef` the factor the loop applied, `clip_max_norm` its max norm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.nn.utils import clip_grad_norm_ as clip_grad_norm_imported_before_watch

import spikedoc
from spikedoc.analysis._rundata import clip_in_use
from spikedoc.analysis.lints import lint
from tests.common.models import char_text, lm_loss, make_model

HAS_SPLIT_CLIP = hasattr(torch.nn.utils, "clip_grads_with_norm_")  # torch >= 2.6
if HAS_SPLIT_CLIP:
    from torch.nn.utils import clip_grads_with_norm_ as clip_grads_with_norm_imported_before_watch
    from torch.nn.utils import get_total_norm as get_total_norm_imported_before_watch


def _by_attribute(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _imported_before_watch(model, max_norm):
    return clip_grad_norm_imported_before_watch(model.parameters(), max_norm)


def _deprecated_clip_grad_norm(model, max_norm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.clip_grad_norm(model.parameters(), max_norm)


def _total_then_clip(model, max_norm):
    total = get_total_norm_imported_before_watch([p.grad for p in model.parameters()])
    clip_grads_with_norm_imported_before_watch(model.parameters(), max_norm, total)  # a generator, on purpose
    return total


CLIP_CALLS = [
    pytest.param(_by_attribute, id="torch.nn.utils.clip_grad_norm_"),
    pytest.param(_imported_before_watch, id="from_torch.nn.utils_import_clip_grad_norm_"),
    pytest.param(_deprecated_clip_grad_norm, id="clip_grad_norm"),
    pytest.param(_total_then_clip, id="get_total_norm+clip_grads_with_norm_",
                 marks=pytest.mark.skipif(not HAS_SPLIT_CLIP, reason="torch < 2.6 has no clip_grads_with_norm_")),
]  # fmt: skip


def _brute_norms(model) -> tuple[float, dict[str, float]]:
    """Total and per-tensor L2 norms of the gradients, in float64, by hand."""
    per = {n: float(p.grad.double().pow(2).sum().sqrt()) for n, p in model.named_parameters()}
    return math.sqrt(sum(v * v for v in per.values())), per


def _clipping_loop(model, opt, steps: int, clip: Callable, max_norm: float, *, logits: bool = False):
    """Train with the loop clipping itself; returns what clip returned and brute-force norms before it."""
    returned, brute = [], []
    for i in range(steps):
        input_ids, labels = char_text().batch(i)
        loss = lm_loss(model(input_ids), labels) if logits else model(input_ids, labels=labels).loss
        loss.backward()
        brute.append(_brute_norms(model))
        returned.append(float(clip(model, max_norm)))
        opt.step()
        opt.zero_grad()
    return returned, brute


@pytest.mark.parametrize("clip", CLIP_CALLS)
def test_grad_norm_is_the_pre_clip_norm_the_loops_clip_returned(tmp_path, clip):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        returned, brute = _clipping_loop(model, opt, 5, clip, max_norm=0.3)
    assert monitor.dropped_rows == 0
    run = spikedoc.load(tmp_path / "run")
    steps = run.steps
    np.testing.assert_allclose(steps["grad_norm"], returned, rtol=1e-6)
    np.testing.assert_allclose(steps["grad_norm"], [total for total, _ in brute], rtol=1e-5)
    np.testing.assert_allclose(steps["clip_coef"], [min(1.0, 0.3 / (r + 1e-6)) for r in returned], rtol=1e-6)
    assert (steps["clip_coef"] < 1).all(), "0.3 is below every step's norm: each step was clipped"
    np.testing.assert_allclose(steps["clip_max_norm"], 0.3, rtol=1e-6)  # stored as float32
    for step, (_, per) in enumerate(brute):  # per-tensor norms are from before the clip, too
        layers = run.layers(first_step=step, last_step=step).set_index("name")["grad_norm"]
        np.testing.assert_allclose(layers[list(per)], list(per.values()), rtol=1e-5)


def test_observing_the_clip_leaves_training_bit_for_bit_unchanged(tmp_path):
    watched, plain = make_model(seed=3), make_model(seed=3)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (watched, plain)]
    clip = _total_then_clip if HAS_SPLIT_CLIP else _by_attribute  # passes a generator where it can
    _clipping_loop(plain, opts[1], 4, clip, max_norm=0.3)
    with spikedoc.watch(watched, opts[0], run_dir=tmp_path / "run"):
        _clipping_loop(watched, opts[0], 4, clip, max_norm=0.3)
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))


@pytest.mark.filterwarnings("ignore:spikedoc. step 0 ended with no loss:UserWarning")  # a logits model, on purpose
def test_a_loop_that_clips_gets_no_no_clipping_lint_and_clip_in_use_is_its_max_norm(tmp_path):
    # At 5.0 the clip never bites (norms ~1): clip_coef stays 1.0, yet clipping is in use.
    model = make_model(logits_only=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "clipped"):
        _clipping_loop(model, opt, 25, _imported_before_watch, max_norm=5.0, logits=True)
    run = spikedoc.load(tmp_path / "clipped")
    assert (run.steps["clip_coef"] == 1.0).all()
    assert clip_in_use(run.meta, run.steps) == 5.0
    assert "no_clipping" not in [f.id for f in lint(run.meta, run.steps)]


def test_a_clip_with_an_infinite_max_norm_only_measures_and_is_not_clipping(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run"):
        returned, _ = _clipping_loop(model, opt, 25, _by_attribute, max_norm=math.inf)
    run = spikedoc.load(tmp_path / "run")
    np.testing.assert_allclose(run.steps["grad_norm"], returned, rtol=1e-6)
    assert run.steps["clip_max_norm"].isna().all() and (run.steps["clip_coef"] == 1.0).all()
    assert clip_in_use(run.meta, run.steps) is None
    assert "no_clipping" in [f.id for f in lint(run.meta, run.steps)]


def test_grad_scaler_unscale_then_clip_records_the_unscaled_pre_clip_norm(tmp_path):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    except (AttributeError, RuntimeError, TypeError) as exc:
        pytest.skip(f"this torch has no CPU GradScaler: {exc}")
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    returned, brute = [], []
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run", scaler=scaler):
        for i in range(4):
            input_ids, labels = char_text().batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids, labels=labels).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # as torch's AMP recipe says: unscale, then clip
            brute.append(_brute_norms(model)[0])
            returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    steps = spikedoc.load(tmp_path / "run").steps
    assert steps["loss_scale"].tolist() == [1024.0] * 4
    np.testing.assert_allclose(steps["grad_norm"], returned, rtol=1e-6)
    np.testing.assert_allclose(steps["grad_norm"], brute, rtol=1e-5)
    assert (steps["grad_norm"] < 10).all(), "unscaled: the scale 1024 is not in the norm"
    np.testing.assert_allclose(steps["clip_coef"], [min(1.0, 0.3 / (r + 1e-6)) for r in returned], rtol=1e-6)


def test_clipping_another_models_parameters_is_not_this_runs_clipping(tmp_path):
    model, other = make_model(seed=0), make_model(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run"):
        for i in range(3):
            input_ids, labels = char_text().batch(i)
            model(input_ids, labels=labels).loss.backward()
            other(input_ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(other.parameters(), 0.01)
            opt.step()
            opt.zero_grad()
    steps = spikedoc.load(tmp_path / "run").steps
    assert steps["clip_max_norm"].isna().all() and (steps["clip_coef"] == 1.0).all()


def test_clipping_every_micro_batch_records_what_the_last_clip_returned(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    last = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing stale to warn about
        with spikedoc.watch(model, opt, run_dir=tmp_path / "run"):
            for i in range(3):
                for k in range(2):
                    input_ids, labels = char_text().batch(2 * i + k)
                    model(input_ids, labels=labels).loss.backward()
                    returned = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3))
                last.append(returned)
                opt.step()
                opt.zero_grad()
    steps = spikedoc.load(tmp_path / "run").steps
    np.testing.assert_allclose(steps["grad_norm"], last, rtol=1e-6)
    np.testing.assert_allclose(steps["clip_max_norm"], 0.3, rtol=1e-6)


def test_a_backward_after_the_clip_warns_once_and_measures_the_gradients_at_the_step(tmp_path):
    # The clip's pre-clip statistics are stale once another backward adds to the gradients: the
    # step's own gradients are measured instead, and the loop is told once.
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    at_step = []
    with pytest.warns(RuntimeWarning, match="changed after clip_grad_norm_") as caught:
        with spikedoc.watch(model, opt, run_dir=tmp_path / "run"):
            for i in range(3):
                for k in range(2):
                    input_ids, labels = char_text().batch(2 * i + k)
                    model(input_ids, labels=labels).loss.backward()
                    if k == 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
                at_step.append(_brute_norms(model)[0])
                opt.step()
                opt.zero_grad()
    assert [w.filename for w in caught if "changed after clip_grad_norm_" in str(w.message)] == [__file__]
    steps = spikedoc.load(tmp_path / "run").steps
    np.testing.assert_allclose(steps["grad_norm"], at_step, rtol=1e-5)
    np.testing.assert_allclose(steps["clip_max_norm"], 0.3, rtol=1e-6)


def test_torchs_clip_function_is_restored_when_the_last_monitor_closes(tmp_path):
    from torch.nn.utils import clip_grad

    fn = getattr(clip_grad, "_clip_grads_with_norm_", clip_grad.clip_grad_norm_)
    original = fn.__closure__[0].cell_contents
    model = make_model()
    first = spikedoc.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "a")
    second = spikedoc.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "b")
    assert fn.__closure__[0].cell_contents is not original
    first.close()
    assert fn.__closure__[0].cell_contents is not original, "the second monitor still observes"
    second.close()
    assert fn.__closure__[0].cell_contents is original


def test_before_torch_2_6_clip_grad_norm_itself_is_observed(tmp_path, monkeypatch):
    # torch < 2.6 has no clip_grads_with_norm_: clip_grad_norm_ is observed, its return value is the
    # total. This torch has both, so the older target is chosen by hand.
    from torch.nn.utils import clip_grad

    from spikedoc.monitor import clipping

    monkeypatch.setattr(clipping, "_target", lambda: (clip_grad.clip_grad_norm_, "clip_grad_norm_", False))
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run"):
        returned, brute = _clipping_loop(model, opt, 4, _imported_before_watch, max_norm=0.3)
    assert clip_grad.clip_grad_norm_.__closure__[0].cell_contents is clip_grad.clip_grad_norm_.__wrapped__
    steps = spikedoc.load(tmp_path / "run").steps
    np.testing.assert_allclose(steps["grad_norm"], returned, rtol=1e-6)
    np.testing.assert_allclose(steps["grad_norm"], [total for total, _ in brute], rtol=1e-5)
    np.testing.assert_allclose(steps["clip_coef"], [min(1.0, 0.3 / (r + 1e-6)) for r in returned], rtol=1e-6)


def _grad_norms_then_step(model, opt, monitor, steps: int) -> tuple[list[tuple[float, dict[str, float]]], list[float]]:
    """Train, asking the monitor for the step's gradient norms before each step; returns brute-force
    norms before the step and the global norms `grad_norm()` gave."""
    brute, given = [], []
    for i in range(steps):
        input_ids, labels = char_text().batch(i)
        model(input_ids, labels=labels).loss.backward()
        brute.append(_brute_norms(model))
        total = monitor.grad_norm()
        per_tensor, params = monitor.tensor_grad_norms()
        assert params == list(model.parameters())
        np.testing.assert_allclose(per_tensor.tolist(), list(brute[-1][1].values()), rtol=1e-5)
        given.append(float(total))
        opt.step()
        opt.zero_grad()
    return brute, given


def test_grad_norm_before_the_step_is_the_exact_pre_clip_norm_and_the_step_records_the_same(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run", clip=0.3, budget=None) as monitor:
        brute, given = _grad_norms_then_step(model, opt, monitor, 4)
    np.testing.assert_allclose(given, [total for total, _ in brute], rtol=1e-5)
    steps = spikedoc.load(tmp_path / "run").steps
    np.testing.assert_allclose(steps["grad_norm"], given, rtol=1e-6)
    np.testing.assert_allclose(steps["clip_coef"], [min(1.0, 0.3 / (g + 1e-6)) for g in given], rtol=1e-6)


def test_clip_after_grad_norm_trains_bit_for_bit_like_clip_without_it(tmp_path):
    # The step's clip= reuses the norms grad_norm() took: the gradients are scaled once, by the same factor.
    asked, plain = make_model(seed=5), make_model(seed=5)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (asked, plain)]
    with spikedoc.watch(asked, opts[0], run_dir=tmp_path / "asked", clip=0.3) as monitor:
        _grad_norms_then_step(asked, opts[0], monitor, 4)
    with spikedoc.watch(plain, opts[1], run_dir=tmp_path / "plain", clip=0.3):
        for i in range(4):
            input_ids, labels = char_text().batch(i)
            plain(input_ids, labels=labels).loss.backward()
            opts[1].step()
            opts[1].zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(asked.parameters(), plain.parameters()))


def test_grad_norm_after_the_loops_own_clip_is_the_norm_before_it(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path / "run") as monitor:
        input_ids, labels = char_text().batch(0)
        model(input_ids, labels=labels).loss.backward()
        before, _ = _brute_norms(model)
        returned = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
        total = monitor.grad_norm()
        opt.step()
    assert float(total) == pytest.approx(before, rel=1e-5)
    assert float(total) == pytest.approx(returned, rel=1e-6)
