"""A run saved and resumed into the same run directory by a second job that loads the checkpoint with
the optimizer's second moments rescaled (a lossy converter; 0: the moments lost)."""

from __future__ import annotations

from pathlib import Path

import torch

import spikedoc
from tests.common.models import char_text, make_model, train


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


def resume_then_bad_batch(run_dir: Path, *, seed: int, resume_at: int, bad_at: int, steps: int,
                          start_sample: bool, batch_size: int = 8) -> None:
    """Train `resume_at` steps of AdamW on the real text, then resume (model and optimizer loaded) in a
    fresh job that meets one batch of random tokens at step `bad_at`. `start_sample`: the resumed job
    passes `watch(start_sample=...)` the stream position saved with the checkpoint, as README says; else
    it leaves the default (the monitor then counts positions from 0 again)."""
    text = char_text()

    def job(first: int, last: int, saved: dict | None) -> dict:
        model = make_model(seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
        position = 0
        if saved is not None:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            position = saved["sample_offset"] if start_sample else 0
        with spikedoc.watch(model, opt, run_dir=run_dir, start_sample=position) as monitor:
            for step in range(first, last):
                ids, labels = text.batch(step, batch_size)
                if step == bad_at:
                    ids = torch.randint(0, text.vocab_size, ids.shape, generator=torch.Generator().manual_seed(step))
                    labels = torch.randint(0, text.vocab_size, ids.shape, generator=torch.Generator().manual_seed(-step))
                model(ids, labels=labels).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(), opt.zero_grad()
            offset = monitor.sample_offset
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "sample_offset": offset}

    job(resume_at, steps, job(0, resume_at, None))
