"""Under data parallelism the guard judges each rank's own loss against that rank's own band: one
rank's bad batch is vetoed as on one machine, not diluted in the mean over ranks."""

from __future__ import annotations

import io

import numpy as np
import torch

from spikedoc.guard.agree import StepValues
from spikedoc.guard.config import GuardConfig
from spikedoc.guard.judge import Judge

RANKS, SIGMA, WARM = 4, 0.03, 120


def _rank_losses(steps: int, seed: int = 0) -> np.ndarray:
    """(steps, RANKS): a flat loss with independent noise on each rank (its own batches)."""
    return 3.0 + SIGMA * np.random.default_rng(seed).standard_normal((steps, RANKS))


def _values(losses: np.ndarray, *, per_rank: bool) -> StepValues:
    return StepValues(float(losses.mean()), 0.5, 0, 0, tuple(float(v) for v in losses) if per_rank else ())


def _warm(judge: Judge, losses: np.ndarray, *, per_rank: bool = True) -> None:
    for s in range(WARM):
        judge.record(judge.judge(s, _values(losses[s], per_rank=per_rank)), lrs=[1e-3])


def _departure(rank: int, sigmas: float, seed: int = 0) -> np.ndarray:
    losses = _rank_losses(WARM + 1, seed)
    losses[WARM, rank] += sigmas * SIGMA  # one rank's bad batch
    return losses


def test_one_ranks_departure_diluted_in_the_mean_is_vetoed_by_its_own_band():
    losses = _departure(rank=2, sigmas=14.0)  # the mean moves by a quarter of it: 7 of its own sigmas
    by_mean, by_rank = Judge(GuardConfig()), Judge(GuardConfig())
    _warm(by_mean, losses, per_rank=False)
    _warm(by_rank, losses)
    assert not by_mean.judge(WARM, _values(losses[WARM], per_rank=False)).veto
    verdict = by_rank.judge(WARM, _values(losses[WARM], per_rank=True))
    assert verdict.veto and verdict.reasons == ("loss_out_of_band",) and verdict.loss_rank == 2


def test_a_ranks_departure_is_judged_as_on_one_machine():
    losses = _departure(rank=1, sigmas=14.0, seed=3)
    ranks, alone = Judge(GuardConfig()), Judge(GuardConfig())
    _warm(ranks, losses)
    for s in range(WARM):  # rank 1's losses alone, as one process would see them
        alone.record(alone.judge(s, StepValues(float(losses[s, 1]), 0.5, 0, 0)), lrs=[1e-3])
    verdict = ranks.judge(WARM, _values(losses[WARM], per_rank=True))
    assert verdict.loss_z == alone.judge(WARM, StepValues(float(losses[WARM, 1]), 0.5, 0, 0)).loss_z


def test_a_clean_step_on_every_rank_is_not_vetoed():
    losses = _rank_losses(WARM + 1, seed=5)
    judge = Judge(GuardConfig())
    _warm(judge, losses)
    verdict = judge.judge(WARM, _values(losses[WARM], per_rank=True))
    assert not verdict.veto and not verdict.loss_flagged


def test_each_ranks_band_is_restored_from_a_checkpoint():
    losses = _departure(rank=3, sigmas=14.0, seed=7)
    judge = Judge(GuardConfig())
    _warm(judge, losses)
    buffer = io.BytesIO()
    torch.save(judge.state_dict(), buffer)  # plain types: a checkpoint loads them with weights_only=True
    buffer.seek(0)
    restored = Judge(GuardConfig())
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.judge(WARM, _values(losses[WARM], per_rank=True)) == judge.judge(WARM, _values(losses[WARM], per_rank=True))


def test_a_resume_on_another_number_of_ranks_starts_new_cold_bands():
    judge = Judge(GuardConfig())
    _warm(judge, _rank_losses(WARM))
    saved = judge.state_dict()
    judge.load_state_dict(saved)
    judge.judge(WARM, StepValues(3.0, 0.5, 0, 0, (3.0, 3.5)))  # two ranks now: their bands start empty
    assert len(judge.rank_bands.detectors) == 2
    assert all(d.window() == [] for d in judge.rank_bands.detectors)
