"""Test-wide settings: one intra-op thread, since the CI box has 2 cores shared by parallel runs."""

from __future__ import annotations

import torch


def pytest_configure(config: object) -> None:
    # Two threads on two shared cores make the tiny test models ~10x slower (spinning), not faster.
    torch.set_num_threads(1)
