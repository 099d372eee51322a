"""State statistics of Muon, Adafactor, Lion, 8-bit Adam, Schedule-Free and SOAP, against brute force on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

import spikedoc
from tests.common.brute import watched_run
from tests.common.models import char_text, make_model

STEPS = 5


def _layers_at(run, step: int) -> dict[str, dict]:
    return {row["name"]: row for row in run.layers(first_step=step, last_step=step).to_dict("records")}


def _assert_update_norms_are_parameter_differences(run, copies) -> None:
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name in layers:  # the tensors the optimizer steps
            diff = (c.after[name] - c.before[name]).double().norm().item()
            assert layers[name]["update_norm"] == pytest.approx(diff, rel=1e-4, abs=1e-9), (step, name)
    assert {p["update_norm"] for p in run.meta["parameters"]} == {"exact"}


def test_muon_records_momentum_norm_and_the_orthogonalized_update(tmp_path):
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    model = make_model(seed=1)
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in matrices))  # Muon trains 2-D matrices only
    opt = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1)
    run, copies = watched_run(model, opt, tmp_path, STEPS)
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name in layers:
            expected = c.state[name]["momentum_buffer"].norm().item()
            assert layers[name]["momentum_norm"] == pytest.approx(expected, rel=1e-5)
    _assert_update_norms_are_parameter_differences(run, copies)


def test_adafactor_records_the_factored_second_moment_it_divides_by(tmp_path):
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    model = make_model(seed=2)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    run, copies = watched_run(model, opt, tmp_path, STEPS)
    eps1 = torch.finfo(torch.float32).eps
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, state in c.state.items():
            row = layers[name]
            if "row_var" in state:  # brute force: form v as torch's Adafactor does
                v = state["row_var"] @ state["col_var"] / state["row_var"].mean(dim=-2, keepdim=True).clamp(min=eps1)
                assert row["row_var_mean"] == pytest.approx(state["row_var"].mean().item(), rel=1e-5)
                assert row["col_var_mean"] == pytest.approx(state["col_var"].mean().item(), rel=1e-5)
            else:
                v = state["variance"]
                assert math.isnan(row["row_var_mean"])
            assert row["var_mean"] == pytest.approx(v.double().mean().item(), rel=1e-4), (step, name)
            assert row["var_max"] == pytest.approx(v.max().item(), rel=1e-5), (step, name)
    _assert_update_norms_are_parameter_differences(run, copies)


def test_lion_records_momentum_and_the_share_of_update_signs_that_flipped(tmp_path):
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="Lion needs the optim extra: pip install -e '.[optim]'")
    model = make_model(seed=3)
    opt = lion_pytorch.Lion(model.parameters(), lr=1e-3)
    run, copies = watched_run(model, opt, tmp_path, STEPS)
    # Brute force: without weight decay each coordinate moves by -lr * sign(update), so the update's
    # sign is that of the parameter difference.
    signs = [{n: (c.before[n] - c.after[n]).sign() for n in c.before} for c in copies]
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, state in c.state.items():
            row = layers[name]
            assert row["momentum_norm"] == pytest.approx(state["exp_avg"].norm().item(), rel=1e-5)
            if step == 0:
                assert math.isnan(row["sign_flip_frac"])
                continue
            flips = (signs[step][name] * signs[step - 1][name] < 0).double().mean().item()
            assert row["sign_flip_frac"] == pytest.approx(flips, abs=1e-6), (step, name)
    assert any(_layers_at(run, STEPS - 1)[n]["sign_flip_frac"] > 0 for n in copies[0].before)
    _assert_update_norms_are_parameter_differences(run, copies)


def test_8bit_adam_records_its_dequantized_moments(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="8-bit Adam needs the optim extra: pip install -e '.[optim]'")
    model = make_model(seed=4)
    # min_8bit_size=16: every tensor of the tiny model keeps its moments in 8 bits.
    opt = bnb.optim.Adam8bit(model.parameters(), lr=1e-3, min_8bit_size=16)
    try:
        run, copies = watched_run(model, opt, tmp_path, STEPS)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"bitsandbytes' 8-bit Adam does not run on this CPU build: {exc}")
    from bitsandbytes.functional import dequantize_blockwise

    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, s in c.state.items():
            assert s["state1"].dtype == torch.uint8
            m = dequantize_blockwise(s["state1"], absmax=s["absmax1"], code=s["qmap1"], blocksize=256)
            v = dequantize_blockwise(s["state2"], absmax=s["absmax2"], code=s["qmap2"], blocksize=256)
            row = layers[name]
            assert row["exp_avg_norm"] == pytest.approx(m.norm().item(), rel=1e-5), (step, name)
            assert row["exp_avg_sq_mean"] == pytest.approx(v.double().mean().item(), rel=1e-5)
            assert row["exp_avg_sq_max"] == pytest.approx(v.max().item(), rel=1e-6)
    _assert_update_norms_are_parameter_differences(run, copies)


def test_schedule_free_records_the_measured_sequence_and_the_averaging_weight(tmp_path):
    schedulefree = pytest.importorskip("schedulefree", reason="needs the optim extra: pip install -e '.[optim]'")
    model = make_model(seed=5)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=3e-3, warmup_steps=3)
    opt.train()
    weight_sums: list[float] = []
    text = char_text()
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        for i in range(STEPS):
            ids, labels = text.batch(i)
            model(ids, labels=labels).loss.backward()
            opt.step()
            weight_sums.append(opt.param_groups[0]["weight_sum"])
            opt.zero_grad()
            opt.eval()  # evaluate at x, as Schedule-Free's recipe says, then back to y
            with torch.no_grad():
                model(ids, labels=labels)
            opt.train()
    assert monitor.dropped_rows == 0  # eval() swaps the parameters right after the step: no row lost
    run = spikedoc.load(tmp_path)
    # Brute force: the weight of step t is what it added to the running sum, over the sum.
    expected = [(s - (weight_sums[t - 1] if t else 0.0)) / s for t, s in enumerate(weight_sums)]
    assert run.steps["sf_averaging_weight"].tolist() == pytest.approx(expected, rel=1e-6)  # stored as float32
    assert run.steps["sf_train_mode"].tolist() == [1.0] * STEPS
    # The LR column is the one each step used: Schedule-Free's own warmup over 3 steps, then 3e-3.
    assert run.steps["lr"].tolist() == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3], rel=1e-6)
    layers = _layers_at(run, STEPS - 1)
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert layers[name]["z_norm"] == pytest.approx(state["z"].norm().item(), rel=1e-5)
        assert layers[name]["exp_avg_sq_max"] == pytest.approx(state["exp_avg_sq"].max().item(), rel=1e-6)


def test_soap_counts_preconditioner_refreshes_and_records_state_norms(tmp_path):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer", reason="needs the optim extra: pip install -e '.[optim]'")
    model = make_model(seed=6)
    opt = pytorch_optimizer.SOAP(model.parameters(), lr=3e-3, precondition_frequency=2)
    run, copies = watched_run(model, opt, tmp_path, 6)
    # Brute force: a tensor's preconditioner was refreshed when its eigenbases Q changed in value.
    refreshed = []
    for step, c in enumerate(copies):
        prev = copies[step - 1].state if step else {}
        count = 0
        for name, s in c.state.items():
            q = [t for t in s.get("Q") or [] if torch.is_tensor(t)]  # a vector's Q holds no matrix
            q_prev = [t for t in (prev.get(name) or {}).get("Q") or [] if torch.is_tensor(t)]
            count += len(q) != len(q_prev) or any(not torch.equal(a, b) for a, b in zip(q, q_prev))
        refreshed.append(float(count))
    assert run.steps["precond_refreshed"].tolist() == refreshed
    assert 0 < sum(refreshed) and 0.0 in refreshed  # some steps refresh, some do not
    layers = _layers_at(run, 5)
    for name, s in copies[5].state.items():
        q = [t for t in s.get("Q") or [] if torch.is_tensor(t)]
        if q:
            expected = math.sqrt(sum(t.double().square().sum().item() for t in q))
            assert layers[name]["state_norm_Q"] == pytest.approx(expected, rel=1e-5)
        assert layers[name]["state_norm_exp_avg"] == pytest.approx(s["exp_avg"].norm().item(), rel=1e-5)


def test_update_norms_of_large_tensors_are_labelled_estimated_in_meta(tmp_path):
    # 131k weight elements: beyond the snapshot's budget, so the weight is sampled, the bias copied whole.
    model = torch.nn.Linear(512, 256)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    with spikedoc.watch(model, opt, run_dir=tmp_path) as monitor:
        for _ in range(2):
            loss = model(torch.randn(4, 512)).square().mean()
            loss.backward()
            opt.step(), opt.zero_grad()
            monitor.record(loss=loss)
    meta = spikedoc.load(tmp_path).meta
    assert {p["name"]: p["update_norm"] for p in meta["parameters"]} == {"weight": "estimated", "bias": "exact"}
    assert meta["watch"]["update_norm"] == "mixed"


def _optimizers() -> dict[str, object]:
    """Each optimizer family on the tiny model, at a learning rate its authors' recipes use for small models."""

    def muon_adamw(model):
        hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
        rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n.startswith("blocks."))]
        return [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.1)]

    def optional(module: str, make):
        def build(model):
            return make(pytest.importorskip(module, reason="needs the optim extra: pip install -e '.[optim]'"), model)
        return build

    return {
        "muon_adamw": muon_adamw,
        "adafactor": lambda model: torch.optim.Adafactor(model.parameters(), lr=1e-2),
        "lion": optional("lion_pytorch", lambda m, model: m.Lion(model.parameters(), lr=3e-4, weight_decay=0.1)),
        "adam8bit": optional("bitsandbytes", lambda m, model: m.optim.Adam8bit(model.parameters(), lr=3e-3, min_8bit_size=16)),
        "schedule_free": optional("schedulefree", lambda m, model: m.AdamWScheduleFree(model.parameters(), lr=3e-3,
                                                                                       warmup_steps=10)),
        "soap": optional("pytorch_optimizer", lambda m, model: m.SOAP(model.parameters(), lr=3e-3, precondition_frequency=5)),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_healthy_run_with_the_optimizer_has_no_incident(tmp_path, name):
    if name in ("muon_adamw", "adafactor") and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon and Adafactor need torch >= 2.9")
    model = make_model(seed=12)
    made = _optimizers()[name](model)
    opts = made if isinstance(made, list) else [made]
    warmup = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)) for o in opts]
    if name == "schedule_free":  # it warms up itself and needs no schedule
        warmup = []
        opts[0].train()
    text = char_text()
    with spikedoc.watch(model, made, run_dir=tmp_path) as monitor:
        for step in range(60):
            ids, labels = text.batch(step)
            model(ids, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for o in opts:
                o.step()
            for s in warmup:
                s.step()
            for o in opts:
                o.zero_grad()
    assert monitor.dropped_rows == 0
    diagnosis = spikedoc.analyze(tmp_path)
    assert diagnosis.incidents == [], [(i.onset_step, i.kind, i.cause) for i in diagnosis.incidents]
    assert not [f.id for f in diagnosis.findings if f.severity == "warning"]


def test_shampoo_counts_the_steps_that_recompute_its_inverse_roots(tmp_path):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer", reason="needs the optim extra: pip install -e '.[optim]'")
    model = make_model(seed=8)
    opt = pytorch_optimizer.Shampoo(model.parameters(), lr=1e-3, preconditioning_compute_steps=3)
    run, copies = watched_run(model, opt, tmp_path, 6)
    # Brute force: a tensor's preconditioner was recomputed when one of its inv_pre_cond_* changed in value.
    refreshed = []
    for step, c in enumerate(copies):
        prev = copies[step - 1].state if step else {}
        count = 0
        for name, s in c.state.items():
            keys = [k for k in s if k.startswith("inv_")]
            count += any(k not in prev.get(name, {}) or not torch.equal(s[k], prev[name][k]) for k in keys)
        refreshed.append(float(count))
    assert run.steps["precond_refreshed"].tolist() == refreshed
    assert 0.0 in refreshed[1:] and max(refreshed[1:]) > 0
