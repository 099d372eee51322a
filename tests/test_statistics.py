"""The pure batched statistics, on real tensors of the tiny transformer, against direct computation."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from spikedoc.monitor.sampling import SampledSnapshot
from spikedoc.monitor.statistics import Chunks, clip_coefficient, max_abs, maxes, nonfinite_counts, norms, sums
from spikedoc.monitor.update_statistics import adam_stats, eps_limit, sgd_update_norms
from tests.common.models import make_model, train


def _trained(optimizer_factory, steps: int = 3):
    """Model and optimizer after `steps` steps, plus the parameters before and after the last one."""
    model = make_model(seed=3)
    opt = optimizer_factory(model)
    train(model, opt, steps - 1)
    before = [p.detach().clone() for p in model.parameters()]
    grads: list[torch.Tensor] = []
    keep = lambda i: grads.extend(p.grad.clone() for p in model.parameters())  # noqa: E731
    train(model, opt, 1, start=steps, after_step=keep)
    return model, opt, before, grads


def test_chunks_cover_every_element_exactly_once_within_budget():
    numels = [5, 0, 17, 3, 64]
    chunks = Chunks(numels, budget=8)
    seen = [torch.zeros(n, dtype=torch.int64) for n in numels]
    for batch in chunks.batches:
        assert sum(b - a for _, a, b in batch) <= 8
        for i, a, b in batch:
            seen[i][a:b] += 1
    assert all(bool((s == 1).all()) for s in seen)
    assert chunks.split


def test_norms_match_direct_computation_for_float32_and_bfloat16():
    model = make_model(seed=0)
    params = [p.detach() for p in model.parameters()]
    for ts in (params, [p.bfloat16() for p in params]):
        got = norms(ts)
        expected = torch.stack([t.double().norm() for t in ts])
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(norms(ts, math.inf).double(), torch.stack([t.double().abs().max() for t in ts]))


@pytest.mark.parametrize("budget", [1 << 22, 500], ids=["whole", "split"])
def test_max_abs_matches_direct_computation_and_keeps_nan(budget):
    model = make_model(seed=0)
    ts = [p.detach().clone() for p in model.parameters()]
    ts[2].view(-1)[-1] = float("nan")
    got = max_abs(ts, Chunks([t.numel() for t in ts], budget))
    for j, t in enumerate(ts):
        if j == 2:
            assert math.isnan(got[j].item())
        else:
            assert got[j].item() == t.abs().max().item()


def test_sums_and_maxes_of_nonnegative_tensors_match_direct_computation():
    ts = [p.detach().square() for p in make_model(seed=0).parameters()]
    torch.testing.assert_close(sums(ts).double(), torch.stack([t.double().sum() for t in ts]), rtol=1e-5, atol=0)
    assert maxes(ts).tolist() == [t.max().item() for t in ts]


@pytest.mark.parametrize("lazy", [True, False], ids=["host_shortcut", "on_device"])
def test_nonfinite_counts_match_direct_count(lazy):
    model = make_model(seed=0)
    ts = [p.detach().clone() for p in model.parameters()]
    ts[0].view(-1)[:7] = float("nan")
    ts[3].view(-1)[-2:] = float("inf")
    ts[5].view(-1)[0] = -float("inf")
    chunks = Chunks([t.numel() for t in ts], budget=500)  # splits the larger tensors
    got = nonfinite_counts(ts, chunks, l2=norms(ts) if lazy else None)
    expected = [float((~torch.isfinite(t)).sum()) for t in ts]
    assert got.tolist() == expected


def test_clip_coefficient_reproduces_clip_grad_norm():
    _, _, _, grads = _trained(lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    total_ref = torch.nn.utils.clip_grad_norm_(reference, 0.05)
    total = torch.linalg.vector_norm(norms(grads))
    mine = [g.clone() for g in grads]
    torch._foreach_mul_(mine, clip_coefficient(total, 0.05))
    assert total.item() == pytest.approx(total_ref.item(), rel=1e-6)
    for a, p in zip(mine, reference):
        torch.testing.assert_close(a, p.grad)
    assert clip_coefficient(total, 1e6).item() == 1.0


def _adam_inputs(opt, params):
    states = [opt.state[p] for p in params]
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    hp = [groups[id(p)] for p in params]
    return states, dict(
        steps=[s["step"].item() for s in states],
        lrs=[g["lr"] for g in hp],
        beta1s=[g["betas"][0] for g in hp],
        beta2s=[g["betas"][1] for g in hp],
        epss=[g["eps"] for g in hp],
        decays=[g["lr"] * g["weight_decay"] if g["decoupled_weight_decay"] else 0.0 for g in hp],
    )


@pytest.mark.parametrize("budget", [1 << 22, 700], ids=["whole", "split"])
def test_adam_stats_match_parameter_difference_and_direct_eps_count(budget):
    def factory(m):
        named = list(m.named_parameters())
        return torch.optim.AdamW([
            {"params": [p for n, p in named if p.dim() >= 2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [p for n, p in named if p.dim() < 2], "lr": 3e-3, "weight_decay": 0.0,
             "betas": (0.7, 0.9), "eps": 1e-5},
        ])  # fmt: skip

    model, opt, before, _ = _trained(factory)
    params = [p for g in opt.param_groups for p in g["params"]]
    order = {id(p): i for i, p in enumerate(model.parameters())}
    states, hp = _adam_inputs(opt, params)
    got = adam_stats(
        [p.detach() for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        chunks=Chunks([p.numel() for p in params], budget), **hp,
    )  # fmt: skip
    without_eps = adam_stats(
        [p.detach() for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        chunks=Chunks([p.numel() for p in params], budget), count_eps=False, **hp,
    )  # fmt: skip
    for j, p in enumerate(params):
        diff = (p.detach().double() - before[order[id(p)]].double()).norm().item()
        assert got["update_norm"][j].item() == pytest.approx(diff, rel=1e-3, abs=2e-7 * p.norm().item())
        assert without_eps["update_norm"][j].item() == pytest.approx(got["update_norm"][j].item(), rel=1e-5)
        v_hat_sqrt = states[j]["exp_avg_sq"].sqrt() / math.sqrt(1 - hp["beta2s"][j] ** hp["steps"][j])
        assert got["above_eps"][j].item() == float((v_hat_sqrt > hp["epss"][j]).sum())
        assert got["denom_sq_sum"][j].item() == pytest.approx(states[j]["exp_avg_sq"].double().sum().item(), rel=1e-5)


@pytest.mark.parametrize("budget", [1 << 22, 900], ids=["whole", "split"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.05),
     dict(momentum=0.8, dampening=0.3, weight_decay=0.02, maximize=True), dict(weight_decay=0.1)],
    ids=["plain", "momentum", "nesterov_wd", "dampening_wd_maximize", "plain_wd"],
)  # fmt: skip
def test_sgd_update_norms_match_parameter_difference(kwargs, budget):
    model, opt, before, grads = _trained(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, **kwargs))
    params = list(model.parameters())
    g = opt.param_groups[0]
    n = len(params)
    got = sgd_update_norms(
        [p.detach() for p in params], grads, [opt.state[p].get("momentum_buffer") for p in params],
        lrs=[g["lr"]] * n, weight_decays=[g["weight_decay"]] * n, momentums=[g["momentum"]] * n,
        nesterovs=[g["nesterov"]] * n, maximizes=[g["maximize"]] * n,
        chunks=Chunks([p.numel() for p in params], budget),
    )  # fmt: skip
    for j, p in enumerate(params):
        diff = (p.detach().double() - before[j].double()).norm().item()
        assert got[j].item() == pytest.approx(diff, rel=1e-3, abs=2e-7 * p.norm().item())


def test_sgd_update_norms_leave_gradients_untouched():
    model, opt, _, grads = _trained(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    )
    params = list(model.parameters())
    kept = copy.deepcopy(grads)
    n = len(params)
    sgd_update_norms(
        params, grads, [opt.state[p]["momentum_buffer"] for p in params], lrs=[0.1] * n, weight_decays=[0.1] * n,
        momentums=[0.9] * n, nesterovs=[True] * n, maximizes=[False] * n,
        chunks=Chunks([p.numel() for p in params], 1 << 22),
    )  # fmt: skip
    for a, b in zip(grads, kept):
        assert torch.equal(a, b)


def test_sampled_snapshot_is_exact_for_small_tensors():
    model = make_model(seed=0)
    params = [p.detach() for p in model.parameters()]
    snap = SampledSnapshot(params, budget=1 << 16)
    before = snap.take(params)
    changed = [p + torch.randn_like(p) * 1e-3 for p in params]
    expected = torch.stack([(c - p).norm() for c, p in zip(changed, params)])
    torch.testing.assert_close(snap.update_norms(changed, before), expected)


def test_sampled_snapshot_estimates_large_tensors_within_a_few_percent():
    # A real Adagrad step on a 512 x 512 layer, sampled at ~2% of its elements.
    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 512)
    opt = torch.optim.Adagrad(layer.parameters(), lr=0.01)
    params = list(layer.parameters())
    snap = SampledSnapshot(params, budget=6000, exact_below=1024, min_sample=1024)
    assert snap.kept <= 6000 + 1024 and snap.sampled == [0]
    for _ in range(3):
        before = snap.take(params)
        copies = [p.detach().clone() for p in params]
        layer(torch.randn(64, 512)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        got = snap.update_norms(params, before)
        expected = [(p.detach() - c).norm().item() for p, c in zip(params, copies)]
        assert got[1].item() == pytest.approx(expected[1], rel=1e-5)  # the bias is copied whole
        assert got[0].item() == pytest.approx(expected[0], rel=0.05)


def test_eps_limit_is_the_last_float_whose_sqrt_v_hat_is_at_or_below_eps():
    # Random steps, beta2 and eps, with torch's own float32 sqrt and division as the reference (its
    # CPU sqrt is not always correctly rounded, so an IEEE model of it would be off by one float).
    rng = random.Random(0)
    cases = [((1 - 0.999**1) ** 0.5, 1e-8), ((1 - 0.95**7) ** 0.5, 1e-6), (0.9999995, 3e-12)]
    for _ in range(500):
        beta2, step = rng.choice([0.9, 0.95, 0.99, 0.999, 0.9999]), rng.randint(1, 100_000)
        cases.append(((1 - beta2**step) ** 0.5, 10 ** rng.uniform(-16, -3)))
    for bc2_sqrt, eps in cases:
        limit = torch.tensor([eps_limit(bc2_sqrt, eps)])
        around = torch.cat([limit.nextafter(torch.tensor([0.0])), limit, limit.nextafter(torch.tensor([math.inf]))])
        assert (around.sqrt() / bc2_sqrt <= eps).tolist() == [True, True, False], (bc2_sqrt, eps)


def test_adam_eps_count_matches_direct_count_when_v_is_zero_huge_mixed_nan_or_empty():
    b2, t, eps = 0.999, 3.0, 1e-8
    bc2_sqrt = (1 - b2**t) ** 0.5
    limit = eps_limit(bc2_sqrt, eps)
    mixed = torch.tensor([0.0, limit, limit * 1.0000002, limit * 0.5, 1.0, math.nan] * 50)
    vs = [torch.zeros(7, 3), torch.full((40,), 1e-3), mixed, torch.empty(0), torch.rand(1000) * 4 * limit]
    ps = [torch.randn(v.shape) for v in vs]
    ms = [torch.randn(v.shape) * 1e-3 for v in vs]
    n = len(vs)
    got = adam_stats(
        ps, ms, vs, steps=[t] * n, lrs=[1e-3] * n, beta1s=[0.9] * n, beta2s=[b2] * n, epss=[eps] * n,
        decays=[1e-4] * n, chunks=Chunks([v.numel() for v in vs], 1 << 22),
    )  # fmt: skip
    for j, v in enumerate(vs):
        at_or_below = int((v.sqrt() / bc2_sqrt <= eps).sum())  # NaN is never at or below
        assert got["above_eps"][j].item() == v.numel() - at_or_below, j
    assert got["denom_sq_max"][0].item() == 0.0 and got["denom_sq_max"][1].item() == pytest.approx(1e-3)
    assert math.isnan(got["denom_sq_max"][2].item())


def test_adam_state_statistics_are_the_same_without_update_norms():
    model, opt, _, _ = _trained(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    params = list(model.parameters())
    states, hp = _adam_inputs(opt, params)
    args = ([p.detach() for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
    chunks = Chunks([p.numel() for p in params], 700)
    full = adam_stats(*args, chunks=chunks, **hp)
    state_only = adam_stats(*args, chunks=chunks, update_norms=False, **hp)
    assert "update_norm" not in state_only
    assert torch.equal(state_only["above_eps"], full["above_eps"])
    assert torch.equal(state_only["denom_sq_max"], full["denom_sq_max"])
    torch.testing.assert_close(state_only["denom_sq_sum"], full["denom_sq_sum"], rtol=1e-5, atol=0)
