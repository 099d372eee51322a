"""watch() in the training setups people use: accumulation, autocast, clipping, GradScaler, compile."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import spikedoc
from tests.common.brute import watched_run
from tests.common.models import char_text, lm_loss, make_model, train


def _step(model, opt, index: int, *, scaler=None, autocast: bool = False) -> float:
    input_ids, labels = char_text().batch(index)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids, labels=labels).loss
    (scaler.scale(loss) if scaler else loss).backward()
    return loss.item()


def test_gradient_accumulation_gives_one_row_per_step_with_mean_loss(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run, copies = watched_run(model, opt, tmp_path, 3, accumulate=4)
    assert run.steps["step"].tolist() == [0, 1, 2]
    assert run.steps["micro_batches"].tolist() == [4, 4, 4]
    np.testing.assert_allclose(run.steps["loss"], [c.loss for c in copies], rtol=1e-6)
    assert run.steps["samples"].tolist() == [32, 32, 32]
    assert run.steps["sample_offset"].tolist() == [0, 32, 64]
    np.testing.assert_allclose(run.steps["grad_norm"], [c.total_grad_norm for c in copies], rtol=1e-5)


def test_a_recorded_loss_of_several_elements_is_recorded_as_their_mean(tmp_path):
    # DataParallel-style: one loss per replica; or a one-element tensor that is not 0-d
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    given = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "assemble failed", no dropped rows
        with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
            for i in range(2):
                input_ids, labels = char_text().batch(i)
                loss = model(input_ids, labels=labels).loss
                loss.backward()
                per_replica = torch.stack([loss.detach(), 2 * loss.detach()]) if i == 0 else loss.detach().reshape(1)
                monitor.record(loss=per_replica)
                given.append(per_replica.mean().item())
                opt.step()
                opt.zero_grad()
    np.testing.assert_allclose(spikedoc.load(tmp_path).steps["loss"], given, rtol=1e-6)


def test_evaluation_forwards_without_grad_are_not_micro_batches(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        for i in range(2):
            _step(model, opt, i)
            with torch.no_grad():
                model(*char_text().batch(100))  # validation in the middle of the step
            opt.step()
            opt.zero_grad()
    steps = spikedoc.load(tmp_path).steps
    assert steps["micro_batches"].tolist() == [1, 1]
    assert steps["samples"].tolist() == [8, 8]


def test_bf16_autocast_records_finite_statistics_matching_clip_grad_norm(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norms, losses = [], []
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        for i in range(3):
            losses.append(_step(model, opt, i, autocast=True))
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item())
            opt.step()
            opt.zero_grad()
    run = spikedoc.load(tmp_path)
    np.testing.assert_allclose(run.steps["grad_norm"], norms, rtol=1e-5)
    np.testing.assert_allclose(run.steps["loss"], losses, rtol=1e-6)
    layers = run.layers()
    assert np.isfinite(layers[["grad_norm", "update_norm", "eps_frac"]].to_numpy()).all()


def test_bfloat16_parameters_are_measured_in_their_own_bucket(tmp_path):
    model = make_model()
    model.head.to(torch.bfloat16)  # mixed dtypes: one bucket per (device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    head_grads = []
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        for i in range(2):
            input_ids, labels = char_text().batch(i)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(input_ids, labels=labels).loss.backward()
            head_grads.append(model.head.weight.grad.float().norm().item())
            opt.step()
            opt.zero_grad()
    layers = spikedoc.load(tmp_path).layers(names=["head.weight"])
    np.testing.assert_allclose(layers["grad_norm"], head_grads, rtol=1e-3)


def test_clip_scales_gradients_exactly_like_clip_grad_norm(tmp_path):
    torch.manual_seed(0)
    a, b = make_model(seed=4), make_model(seed=4)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.5, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    expected_norms = []
    with spikedoc.watch(a, opt_a, run_dir=tmp_path, clip=0.3):
        for i in range(4):
            _step(a, opt_a, i)
            opt_a.step()
            opt_a.zero_grad()
            _step(b, opt_b, i)
            expected_norms.append(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.3).item())
            opt_b.step()
            opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    steps = spikedoc.load(tmp_path).steps
    np.testing.assert_allclose(steps["grad_norm"], expected_norms, rtol=1e-5)
    np.testing.assert_allclose(steps["clip_coef"], [min(1.0, 0.3 / (n + 1e-6)) for n in expected_norms], rtol=1e-5)
    assert (steps["clip_coef"] < 1).all()


def test_grad_scaler_records_loss_scale_and_a_skipped_step(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    scales, params_at_skip = [], None
    with spikedoc.watch(model, opt, run_dir=tmp_path, scaler=scaler) as monitor:
        for i in range(4):
            _step(model, opt, i, scaler=scaler)
            if i == 2:  # an overflow: the scaler must skip this optimizer step
                model.head.weight.grad[0, 0] = float("inf")
                params_at_skip = [p.detach().clone() for p in model.parameters()]
            scales.append(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
            if i == 2:
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_at_skip))
            opt.zero_grad()
        assert monitor.step == 4
    run = spikedoc.load(tmp_path)
    steps = run.steps
    assert steps["step"].tolist() == [0, 1, 2, 3]
    assert steps["skipped"].tolist() == [False, False, True, False]
    assert steps["loss_scale"].tolist() == scales == [1024.0, 1024.0, 1024.0, 512.0]
    assert steps["update_norm"][2] == 0.0 and steps["update_norm"][3] > 0
    assert steps["nonfinite_grads"].tolist() == [0, 0, 1, 0]
    skipped_layers = run.layers(first_step=2, last_step=2).set_index("name")
    assert skipped_layers.loc["head.weight", "nonfinite"] == 1
    assert (skipped_layers["update_norm"] == 0).all()
    # Gradients are recorded unscaled: scaler.step() unscales them before the optimizer sees them.
    assert steps["grad_norm"][3] < 100


def test_fused_adamw_under_grad_scaler_records_unscaled_gradients_and_its_own_skip(tmp_path):
    # Fused optimizers unscale and skip inf steps inside step(); the scaler does neither for them.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    norms = []
    with spikedoc.watch(model, opt, run_dir=tmp_path, scaler=scaler):
        for i in range(4):
            _step(model, opt, i, scaler=scaler)
            scaled = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
            norms.append(scaled / scaler.get_scale())  # the gradients are still scaled here
            if i == 2:
                model.head.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    steps = spikedoc.load(tmp_path).steps
    assert steps["skipped"].tolist() == [False, False, True, False]
    np.testing.assert_allclose(steps["grad_norm"][[0, 1, 3]], [norms[i] for i in (0, 1, 3)], rtol=1e-5)
    assert steps["update_norm"][2] == 0 and steps["nonfinite_grads"][2] == 1
    assert steps["loss_scale"].tolist() == [1024.0, 1024.0, 1024.0, 512.0]


def _train_compiled(compiled, opt, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        input_ids, labels = char_text().batch(i)
        loss = compiled(input_ids, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("watch_compiled", [True, False], ids=["watch_compiled", "watch_original"])
def test_torch_compile_records_clean_names_and_every_step(tmp_path, watch_compiled):
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")  # inductor works too but compiles for ~30 s here
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(compiled if watch_compiled else model, opt, run_dir=tmp_path):
        losses = _train_compiled(compiled, opt, 3)
    run = spikedoc.load(tmp_path)
    assert run.steps["micro_batches"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(run.steps["loss"], losses, rtol=1e-6)
    names = set(run.layers()["name"])
    assert names == {n for n, _ in model.named_parameters()}
    assert run.steps["batch_hash"].notna().all()


def test_inductor_compiles_the_watched_model_without_a_graph_break(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model()
    compiled = torch.compile(model)  # the default backend, inductor
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(compiled, opt, run_dir=tmp_path, budget=None):
        losses = _train_compiled(compiled, opt, 3)
    assert dict(counters["graph_break"]) == {}
    run = spikedoc.load(tmp_path)
    np.testing.assert_allclose(run.steps["loss"], losses, rtol=1e-6)
    assert run.steps["micro_batches"].tolist() == [1, 1, 1] and run.steps["batch_hash"].notna().all()
    assert run.layers()["update_ratio"].notna().all()


def test_every_and_layer_every_choose_the_logged_steps(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run, copies = watched_run(model, opt, tmp_path, 7, watch={"every": 2, "layer_every": 3})
    assert run.steps["step"].tolist() == [0, 2, 4, 6]
    assert sorted(set(run.layers()["step"])) == [0, 3, 6]
    np.testing.assert_allclose(run.steps["grad_norm"], [copies[i].total_grad_norm for i in (0, 2, 4, 6)], rtol=1e-5)
    # Steps without layer rows (2 and 4) take the cheaper update-norm path: still exact.
    diffs = [
        math.sqrt(sum((c.after[n].double() - c.before[n].double()).norm().item() ** 2 for n in c.before))
        for c in copies
    ]
    np.testing.assert_allclose(run.steps["update_norm"], [diffs[i] for i in (0, 2, 4, 6)], rtol=1e-3)
    # Positions in the stream count every step, logged or not.
    assert run.steps["sample_offset"].tolist() == [0, 16, 32, 48]


def test_nonfinite_gradients_are_counted_not_raised(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def poison(i: int) -> None:
        if i == 1:
            model.head.weight.grad[:3] = float("nan")
            model.tok.weight.grad[0, 0] = float("inf")

    with spikedoc.watch(model, opt, run_dir=tmp_path):
        train(model, opt, 2, before_step=poison)
    run = spikedoc.load(tmp_path)
    assert run.steps["nonfinite_grads"].tolist() == [0, 3 * 32 + 1]
    assert math.isnan(run.steps["grad_norm"][1])
    layers = run.layers(first_step=1, last_step=1).set_index("name")
    assert layers.loc["head.weight", "nonfinite"] == 96 and layers.loc["tok.weight", "nonfinite"] == 1
    assert layers["nonfinite"].sum() == 97


@pytest.mark.filterwarnings("ignore:spikedoc. step 0 ended with no loss:UserWarning")  # its forward returns no loss
def test_a_statistic_that_raises_warns_once_and_training_continues(tmp_path):
    # Sparse gradients have no foreach norm: a real failure inside the step hooks.
    emb = torch.nn.Embedding(20, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="spikedoc: step_pre failed") as caught:
        with spikedoc.watch(emb, opt, run_dir=tmp_path) as monitor:
            for i in range(3):
                emb(torch.tensor([i, i + 1])).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()
    assert sum("spikedoc: step_pre failed" in str(w.message) for w in caught) == 1
    assert monitor.step == 3
    assert monitor.dropped_rows == 3 * 2  # per step: its row and one layer row
    assert emb.weight.grad is None or emb.weight.grad._nnz() == 0  # training itself went on


def test_clipping_still_applies_when_the_step_statistics_failed(tmp_path):
    # A forward input whose every torch operation raises breaks the step's fingerprint, and so its
    # statistics; clip= is part of training and must still happen.
    class Opaque(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.dim, torch.Tensor.shape.__get__, torch.Tensor.is_floating_point,
                        torch.Tensor.is_complex, torch.Tensor.layout.__get__):  # fmt: skip
                return super().__torch_function__(func, types, args, kwargs or {})
            raise NotImplementedError(f"{func} on an opaque input")

    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model(seed=5)

        def forward(self, input_ids, labels, extra):
            return self.inner(input_ids, labels=labels)

    model, reference = WithExtra(), make_model(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    odd = torch.zeros(2).as_subclass(Opaque)
    with pytest.warns(RuntimeWarning, match="fingerprint failed"):
        with spikedoc.watch(model, opt, run_dir=tmp_path, clip=0.1) as monitor:
            for i in range(2):
                model(*char_text().batch(i), odd).loss.backward()
                opt.step()
                opt.zero_grad()
                reference(*char_text().batch(i)).loss.backward()
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
                ref_opt.step()
                ref_opt.zero_grad()
    for a, b in zip(model.inner.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert monitor.dropped_rows == 2 * (1 + len(list(model.parameters())))


def test_record_overrides_loss_and_adds_samples_and_columns(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        for i in range(2):
            input_ids, labels = char_text().batch(i)
            out = model(input_ids, labels=labels)
            per_sample = torch.nn.functional.cross_entropy(
                out.logits.transpose(1, 2), labels, reduction="none"
            ).mean(1)  # (B,)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            # After the step and before the next forward: belongs to the step just taken.
            monitor.record(loss=torch.tensor(10.0 + i), sample_ids=[f"doc{i}-{j}" for j in range(8)],
                           sample_losses=per_sample.detach(), tokens_per_sec=123.5)  # fmt: skip
    steps = spikedoc.load(tmp_path).steps
    assert steps["loss"].tolist() == [10.0, 11.0]
    assert list(steps["sample_ids"][1]) == [f"doc1-{j}" for j in range(8)]
    assert len(steps["sample_losses"][0]) == 8 and np.isfinite(list(steps["sample_losses"][0])).all()
    assert steps["tokens_per_sec"].tolist() == [123.5, 123.5]


def test_sample_ids_given_as_an_integer_tensor_are_recorded_as_the_integers_they_are(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([2**40 + 3, 7, 0])  # beyond float32's exact integers
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        input_ids, labels = char_text().batch(0)
        loss = model(input_ids, labels=labels).loss
        monitor.record(loss=loss, sample_ids=ids)
        loss.backward()
        opt.step()
    # The column holds strings (ids may be names): those of the integers, not of floats ("7.0").
    assert list(spikedoc.load(tmp_path).steps["sample_ids"][0]) == [str(2**40 + 3), "7", "0"]


def test_models_without_a_loss_output_record_the_loss_given(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        for _ in range(3):
            x = torch.randn(16, 4)
            loss = model(x).pow(2).mean()
            monitor.record(loss=loss.item())  # before the step: belongs to the current step
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    steps = spikedoc.load(tmp_path).steps
    np.testing.assert_allclose(steps["loss"], losses, rtol=1e-6)
    assert steps["tokens"].tolist() == [0, 0, 0] and steps["seq_len_min"].isna().all()


def test_resume_appends_a_segment_and_continues_the_step_count(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path):
        train(model, opt, 3)
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        assert monitor.step == 3  # Adam's own step count
        train(model, opt, 2, start=3)
    run = spikedoc.load(tmp_path)
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.steps["segment"].tolist() == [0, 0, 0, 1, 1]
    assert [s["segment"] for s in run.meta["segments"]] == [0, 1]


def test_start_step_is_used_when_the_optimizer_keeps_no_count(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with spikedoc.watch(model, opt, run_dir=tmp_path, start_step=100):
        train(model, opt, 2)
    assert spikedoc.load(tmp_path).steps["step"].tolist() == [100, 101]


def test_checkpoint_events_carry_the_next_step_index(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        train(model, opt, 3, after_step=lambda i: i == 1 and monitor.event("checkpoint", path="ckpt-2.pt"))
    events = spikedoc.load(tmp_path).events
    ckpt = events[events["kind"] == "checkpoint"]
    assert ckpt["step"].tolist() == [2] and '"ckpt-2.pt"' in ckpt["detail"].iloc[0]
    assert {"start", "close"} <= set(events["kind"])


def test_parameters_without_gradients_have_zero_update(tmp_path):
    model = make_model()
    model.pos.weight.requires_grad_(False)  # frozen but still handed to the optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    run, copies = watched_run(model, opt, tmp_path, 2)
    layers = run.layers(first_step=1, last_step=1).set_index("name")
    assert layers.loc["pos.weight", "update_norm"] == 0 and layers.loc["pos.weight", "grad_norm"] == 0
    assert np.isnan(layers.loc["pos.weight", "eps_frac"])
    diff = (copies[1].after["tok.weight"] - copies[1].before["tok.weight"]).norm().item()
    assert layers.loc["tok.weight", "update_norm"] == pytest.approx(diff, rel=1e-3)


def test_watch_rejects_bad_options_naming_them():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        spikedoc.watch(model, opt, run_dir="unused", every=0)
    with pytest.raises(ValueError, match="clip"):
        spikedoc.watch(model, opt, run_dir="unused", clip=-1.0)
    with pytest.raises(ValueError, match="start_sample"):
        spikedoc.watch(model, opt, run_dir="unused", start_sample=-8)
    with pytest.raises(TypeError, match="optimizer"):
        spikedoc.watch(model, "adam")


def test_sample_offsets_count_on_from_start_sample_and_skipped_samples(tmp_path):
    model = make_model(logits_only=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = spikedoc.watch(model, opt, run_dir=tmp_path / "run", start_sample=640)
    for i in range(3):
        input_ids, labels = char_text().batch(i)
        loss = lm_loss(model(input_ids), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.record(loss=loss)
        if i == 0:
            monitor.skip_samples(len(input_ids))  # a batch the loop drew and left out
    monitor.close()
    n = len(char_text().batch(0)[0])
    assert spikedoc.load(tmp_path / "run").steps["sample_offset"].tolist() == [640, 640 + 2 * n, 640 + 3 * n]


def _logits_loop(model, opt, monitor, steps: int, *, record: bool) -> list[float]:
    losses = []
    for i in range(steps):
        input_ids, labels = char_text().batch(i)
        loss = lm_loss(model(input_ids), labels)  # the loss is computed in the loop, not in forward
        loss.backward()
        opt.step()
        opt.zero_grad()
        if record:
            monitor.record(loss=loss)
        losses.append(loss.item())
    return losses


def test_a_model_returning_logits_warns_once_with_the_fix_and_records_no_loss(tmp_path):
    model = make_model(logits_only=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"step 0 ended with no loss .*monitor\.record\(loss=loss\)") as caught:
        with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
            _logits_loop(model, opt, monitor, 4, record=False)
    assert sum("ended with no loss" in str(w.message) for w in caught) == 1
    assert caught[0].filename == __file__, "the warning points at the training loop"
    steps = spikedoc.load(tmp_path).steps
    assert steps["loss"].isna().all() and steps["grad_norm"].notna().all()


def test_recording_the_loss_in_the_loop_fills_the_loss_and_silences_the_warning(tmp_path):
    model = make_model(logits_only=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
            losses = _logits_loop(model, opt, monitor, 4, record=True)
    np.testing.assert_allclose(spikedoc.load(tmp_path).steps["loss"], losses, rtol=1e-6)


def test_a_tuple_output_with_one_scalar_loss_is_captured_as_the_loss(tmp_path):
    # nanoGPT's forward returns (logits, loss); HF's return_dict=False returns (loss, logits, ...).
    class Gpt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model(logits_only=True)

        def forward(self, input_ids, labels):
            logits = self.inner(input_ids)
            return logits, lm_loss(logits, labels)

    model = Gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with spikedoc.watch(model, opt, run_dir=tmp_path):
            for i in range(3):
                _, loss = model(*char_text().batch(i))
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
    np.testing.assert_allclose(spikedoc.load(tmp_path).steps["loss"], losses, rtol=1e-6)


def test_sample_ids_are_those_given_even_when_the_loop_refills_their_buffer(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    buffer = torch.zeros(3, dtype=torch.long)
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        for i in range(2):
            buffer.copy_(torch.tensor([10 * i, 10 * i + 1, 10 * i + 2]))
            input_ids, labels = char_text().batch(i)
            loss = model(input_ids, labels=labels).loss
            monitor.record(loss=loss, sample_ids=buffer)
            loss.backward()
            opt.step()
            opt.zero_grad()
            buffer.fill_(-1)  # the loop reuses the buffer right after the step
    ids = spikedoc.load(tmp_path).steps["sample_ids"]
    assert [list(x) for x in ids] == [["0", "1", "2"], ["10", "11", "12"]]


def _fresh_run_into(run_dir, **watch):
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = spikedoc.watch(model, opt, run_dir=run_dir, **watch)
    train(model, opt, 3)
    monitor.close()
    return model, opt


def test_a_fresh_run_into_a_directory_that_holds_a_run_is_warned_about(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first run into the directory: nothing to say
        _fresh_run_into(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"already holds a run \(segments 0\.\.0\); this one is recorded as segment 1"):
        _fresh_run_into(tmp_path / "run")


def test_a_resume_that_says_where_it_starts_is_not_warned_about(tmp_path):
    _fresh_run_into(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fresh_run_into(tmp_path / "run", start_step=3)
