"""Several optimizers on one model (Muon for the matrices, AdamW for the rest), against brute force."""

from __future__ import annotations

import math

import pytest
import torch

import spikedoc
from tests.common.brute import Together, watched_run
from tests.common.models import char_text, make_model, train

STEPS = 4
pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def _muon_and_adamw(model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    # The usual split: Muon for the hidden 2-D weights, AdamW for embeddings, head, norms and biases.
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n.startswith("blocks."))]
    return [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.1)]


def _layers_at(run, step: int) -> dict[str, dict]:
    return {row["name"]: row for row in run.layers(first_step=step, last_step=step).to_dict("records")}


@pytest.fixture(scope="module", params=["muon_first", "adamw_first"])
def recorded(request, tmp_path_factory):
    model = make_model(seed=5)
    muon, adamw = _muon_and_adamw(model)
    order = [muon, adamw] if request.param == "muon_first" else [adamw, muon]
    run, copies = watched_run(model, order, tmp_path_factory.mktemp("list"), STEPS)
    owner = {id(p): k for k, opt in enumerate(order) for g in opt.param_groups for p in g["params"]}
    names = {n: owner[id(p)] for n, p in model.named_parameters()}
    return order, names, run, copies


def test_one_row_per_training_step_whatever_the_optimizer_order(recorded):
    _, _, run, copies = recorded
    assert run.steps["step"].tolist() == list(range(STEPS))
    for step, c in enumerate(copies):
        diff = math.sqrt(sum((c.after[n] - c.before[n]).double().square().sum().item() for n in c.before))
        assert run.steps["update_norm"][step] == pytest.approx(diff, rel=1e-4)
        assert run.steps["grad_norm"][step] == pytest.approx(c.total_grad_norm, rel=1e-5)


def test_each_tensor_gets_the_statistics_of_the_optimizer_that_owns_it(recorded):
    order, owner, run, copies = recorded
    muon = next(k for k, opt in enumerate(order) if isinstance(opt, torch.optim.Muon))
    for step, c in enumerate(copies):
        layers = _layers_at(run, step)
        for name, state in c.state.items():
            row = layers[name]
            diff = (c.after[name] - c.before[name]).double().norm().item()
            assert row["update_norm"] == pytest.approx(diff, rel=1e-4, abs=1e-9), (step, name)
            if owner[name] == muon:
                assert row["momentum_norm"] == pytest.approx(state["momentum_buffer"].norm().item(), rel=1e-5)
                assert math.isnan(row["exp_avg_norm"])
            else:
                assert row["exp_avg_norm"] == pytest.approx(state["exp_avg"].norm().item(), rel=1e-5)
                assert math.isnan(row["momentum_norm"])


def test_meta_records_which_optimizer_owns_each_tensor_and_each_group(recorded):
    order, owner, run, _ = recorded
    meta = run.meta
    assert {p["name"]: p["optimizer"] for p in meta["parameters"]} == owner
    classes = [o["class"].rsplit(".", 1)[-1] for o in meta["optimizer"]["optimizers"]]
    assert classes == [type(opt).__name__ for opt in order]
    groups = meta["optimizer"]["groups"]
    assert [g["optimizer"] for g in groups] == [0, 1]
    # The run's group g is the g-th group of the optimizers in turn: its LR is lr / lr_<g>.
    assert run.steps["lr"].iloc[0] == pytest.approx(order[0].param_groups[0]["lr"])
    assert run.steps["lr_1"].iloc[0] == pytest.approx(order[1].param_groups[0]["lr"])


def test_training_with_several_optimizers_is_unchanged_by_watching(tmp_path):
    finals = []
    for watched in (False, True):
        model = make_model(seed=6)
        opts = _muon_and_adamw(model)
        monitor = spikedoc.watch(model, opts, run_dir=tmp_path / str(watched)) if watched else None
        train(model, Together(opts), 3)
        if monitor is not None:
            monitor.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_an_optimizer_stepped_every_other_step_ends_its_step_at_the_next_forward(tmp_path):
    # AdamW every step, Muon only on even steps: every iteration is still one recorded step.
    model = make_model(seed=7)
    muon, adamw = _muon_and_adamw(model)
    text = char_text()
    with spikedoc.watch(model, [muon, adamw], run_dir=tmp_path) as monitor:
        for i in range(6):
            ids, labels = text.batch(i)
            model(ids, labels=labels).loss.backward()
            adamw.step()
            if i % 2 == 0:
                muon.step()
            adamw.zero_grad(), muon.zero_grad()
    assert monitor.dropped_rows == 0
    steps = spikedoc.load(tmp_path).steps
    assert steps["step"].tolist() == list(range(6))


def test_watch_refuses_optimizers_that_share_a_parameter(tmp_path):
    model = torch.nn.Linear(3, 3)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.AdamW([model.weight], lr=0.1)
    with pytest.raises(ValueError, match="share parameters"):
        spikedoc.watch(model, [a, b], run_dir=tmp_path)
    with pytest.raises(TypeError, match="list of them"):
        spikedoc.watch(model, [a, "adam"], run_dir=tmp_path)
