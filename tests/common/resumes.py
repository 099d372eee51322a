"""A run saved and resumed into the same run directory by a second job that loads the checkpoint with
the optimizer's second moments rescaled (a lossy converter; 0: the moments lost)."""

from __future__ import annotations

from pathlib import Path

import torch

import spikedoc
from tests.common.models import make_model, train


def resume_with_second_moments_scaled(run_dir: Path, *, seed: int, resume_at: int, steps: int, scale: float,
                                      betas: tuple[float, float] = (0.9, 0.95), lr: float = 3e-3) -> None:
    """Train `resume_at` steps of AdamW, save model and optimizer state, then resume in a fresh job that
    loads both with every `exp_avg_sq` multiplied by `scale`, and train on to `steps`. Every statistic is
    recorded every step (`budget=None`), so the moments on both sides of the resume are measured."""

    def job(first: int, saved: dict | None) -> dict:
        model = make_model(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas)
        if saved is not None:
            model.load_state_dict(saved["model"])
            for state in saved["optimizer"]["state"].values():
                state["exp_avg_sq"].mul_(scale)
            opt.load_state_dict(saved["optimizer"])
        with spikedoc.watch(model, opt, run_dir=run_dir, budget=None):
            train(model, opt, (resume_at if saved is None else steps) - first, start=first)
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}

    job(resume_at, job(0, None))
