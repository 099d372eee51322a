"""A loader stuck on one batch: the same batch at consecutive steps is a run-level finding."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import spikedoc
from tests.common.models import char_text, make_model


def _train(run_dir, batch_of: Callable[[int], int], *, steps: int, seed: int = 0, accumulate: int = 1,
           optimizer: str = "adamw") -> spikedoc.Diagnosis:  # fmt: skip
    model = make_model(seed)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))  # fmt: skip
    monitor = spikedoc.watch(model, opt, run_dir=run_dir)
    text = char_text()
    for step in range(steps):
        for k in range(accumulate):
            input_ids, labels = text.batch(batch_of(step) * accumulate + k)
            (model(input_ids, labels=labels).loss / accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    monitor.close()
    return spikedoc.analyze(run_dir)


def _repeats(diagnosis) -> list:
    return [f for f in diagnosis.findings if f.id == "batch_repeated"]


@pytest.mark.parametrize(("stuck", "seed", "accumulate", "optimizer"), [((40, 49), 0, 1, "adamw"), ((23, 25), 3, 2, "sgd")])
def test_a_loader_stuck_on_one_batch_is_named_with_its_steps(tmp_path, stuck, seed, accumulate, optimizer):
    first, last = stuck
    diagnosis = _train(tmp_path, lambda s: first if first <= s <= last else s, steps=60, seed=seed,
                       accumulate=accumulate, optimizer=optimizer)  # fmt: skip
    (finding,) = _repeats(diagnosis)
    assert [(s["first_step"], s["last_step"], s["steps"]) for s in finding.details["stretches"]] == [(first, last, last - first + 1)]
    assert f"steps {first}..{last}" in finding.message


def test_a_run_whose_batches_all_differ_has_no_repeat_finding(tmp_path):
    assert _repeats(_train(tmp_path, lambda s: s, steps=60)) == []


def test_a_batch_seen_again_later_but_not_in_a_row_is_no_stuck_loader(tmp_path):
    # A second epoch (or a sampler with replacement) repeats batches, never the one just trained on.
    assert _repeats(_train(tmp_path, lambda s: s % 20, steps=60)) == []
