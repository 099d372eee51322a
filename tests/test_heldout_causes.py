"""Faults of the spike suite at seeds, steps and sizes its rules were not set on (odd seeds), trained for real."""

from __future__ import annotations

import pytest

import spikedoc
from spikedoc.demo.training import Recipe, RunSpec, generate_run


@pytest.mark.parametrize(("seed", "step", "recipe"), [
    (3, 170, Recipe(d_model=48, n_head=4)),
    (5, 230, Recipe(n_layer=3)),
])
def test_zeroed_second_moments_are_the_optimizer_state_whatever_the_seed_step_or_size(tmp_path, seed, step, recipe):
    spec = RunSpec(name=f"opt{seed}", fault="zero_exp_avg_sq", step=step, seed=seed)
    generate_run(spec, tmp_path / "run", recipe=recipe, checkpoint_dir=tmp_path / "ckpt")
    inc = next(i for i in spikedoc.analyze(tmp_path / "run").incidents if step <= i.onset_step <= step + 3)
    actions = {a["action"] for a in inc.recommendation["actions"]}
    assert inc.cause == "optimizer_state", inc.evidence
    # Zeroed in one step, further than Adam's own updates can shrink them: a writer to find, and the
    # rollback puts sound moments back (no reset, no LR or clipping change).
    assert "find_state_writer" in actions and not {"load_state", "skip_data", "reset_moments", "lower_lr"} & actions
