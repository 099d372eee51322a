"""`spikedoc demo --guard`: the demo's tiny GPT trained under `spikedoc.Guard`, a fault planted, healed.

The same recipe, model and text as the spike suite (`spikedoc.demo.training`), with the data as a
re-iterable sequence of deterministic batches (so a rollback can replay it) and the schedule as a
LambdaLR (so a rollback can scale it). The fault is planted once: a replay after a rollback runs
clean, as it would after a transient hardware fault or a skipped bad batch.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import spikedoc
from spikedoc.demo.training import Recipe, RunSpec, _deterministic, _fresh, _pad, _planted_batch, corpus

__all__ = ["guarded_run"]

_STEP = {"bad_batch_long": 170, "optimizer_state": 150, "nan": 200, "optimizer_state_returning": 150}
#: Faults planted every time their step is reached (a replay meets them again), not once.
_RETURNING = {"optimizer_state_returning"}


class _Batches:
    """Batch i of the demo stream, for i = 0, 1, ...: the same batches on every pass (twice the
    recipe's steps of them, so that skipped batches leave enough for the run)."""

    def __init__(self, recipe: Recipe, data: torch.Tensor, seed: int) -> None:
        self.recipe, self.data, self.seed = recipe, data, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        r = self.recipe
        for i in range(2 * r.steps):
            gen = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + i)
            lengths = torch.randint(r.min_len, r.max_len + 1, (r.batch,), generator=gen)
            offsets = torch.randint(0, len(self.data) - r.max_len, (r.batch,), generator=gen)
            rows = [self.data[o : o + n] for o, n in zip(offsets.tolist(), lengths.tolist())]
            ids, mask = _pad(rows, int(lengths.max()))
            yield {"ids": ids, "mask": mask, "sample_ids": [f"topics@{o}+{n}" for o, n in zip(offsets.tolist(), lengths.tolist())]}


def guarded_run(run_dir: str | Path, fault: str | None = "optimizer_state") -> dict[str, Any]:
    """Train the demo GPT under a Guard into `run_dir` (replaced if present) with `fault` planted once
    (None: no fault, the clean run to compare with).

    Returns:
        `{"steps", "vetoes", "rollbacks", "final_loss", "actions"}` (the guard's actions as recorded).

    Example:
        >>> guarded_run("/tmp/guarded", "nan")["rollbacks"]  # doctest: +SKIP
        1
    """
    if fault is not None and fault not in _STEP:
        raise ValueError(f"unknown guarded demo fault {fault!r}; choose one of: {', '.join(_STEP)}")
    recipe, run_dir, at = Recipe(), Path(run_dir), _STEP.get(fault, -1)
    shutil.rmtree(run_dir, ignore_errors=True)
    losses: dict[int, float] = {}
    with _deterministic(0):
        model, opt = _fresh(recipe, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: recipe.lr_at(min(s, recipe.steps - 1)) / recipe.lr)
        data = _Batches(recipe, torch.tensor(list(corpus()), dtype=torch.long), 0)
        guard = spikedoc.Guard(model, opt, scheduler=schedule, data=data, run_dir=run_dir,
                               checkpoint_every=recipe.checkpoint_every, max_steps=recipe.steps)  # fmt: skip
        planted = False
        try:
            for step, batch in guard:
                ids, mask, sample_ids = batch["ids"], batch["mask"], batch["sample_ids"]
                if step == at and (not planted or fault in _RETURNING):
                    planted = True
                    ids, mask, sample_ids = _plant(fault, recipe, guard, model, opt, (ids, mask, sample_ids))
                nll = model(input_ids=ids, attention_mask=mask)  # (B, T-1)
                tokens = mask[:, 1:].sum(1).clamp(min=1)  # (B,)
                token_mean = nll.detach().sum() / tokens.sum()
                guard.record(loss=token_mean, sample_ids=sample_ids)
                (nll.sum() / len(ids)).backward()  # sentence-averaged, as in the spike suite
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
                losses[step] = float(token_mean)
        finally:
            guard.close()
    return {"steps": guard.step, "vetoes": guard.vetoes, "rollbacks": guard.rollbacks,
            "final_loss": sum(losses[s] for s in range(recipe.steps - 10, recipe.steps)) / 10, "actions": guard.actions}  # fmt: skip


def _plant(fault: str, recipe: Recipe, guard: Any, model: Any, opt: torch.optim.Optimizer,
           batch: tuple[torch.Tensor, torch.Tensor, list[str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # fmt: skip
    """Plant `fault`; returns the batch to train on (the planted one for a bad-batch fault)."""
    if fault == "bad_batch_long":
        return _planted_batch(RunSpec(name=fault, fault="long_batch"), recipe, *batch)
    if fault in ("optimizer_state", "optimizer_state_returning"):
        for state in opt.state.values():
            state["exp_avg_sq"].zero_()
    else:
        with torch.no_grad():
            model.blocks[1].fc.weight[3, 5] = math.inf
    return batch


