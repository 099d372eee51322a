"""Which checkpoint a new guard continues from: asked for, or automatically only the same job after a crash."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from spikedoc.guard.agree import agree_all, common_steps
from spikedoc.guard.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from spikedoc.guard.job import differences

__all__ = ["resume_point"]


def resume_point(
    store: CheckpointStore, resume: bool | str | Path | None, *, job: dict[str, Any], run_dir: Path
) -> tuple[Checkpoint, dict[str, Any]] | None:
    """The checkpoint and state to continue from (`GuardConfig.resume`), or None to start fresh.

    Args:
        store: The run directory's checkpoints.
        resume: True (the newest readable one, whatever its job), a checkpoint's path, False (never),
            None (the newest readable one only if it is this job's: `job_fingerprint` equal).
        job: This run's job fingerprint.
        run_dir: For the messages.

    Raises:
        ValueError: an unreadable path, `resume=True` with no checkpoint, or another job's
            checkpoints under `resume=None`.
    """
    if resume is False:
        return None  # another run's checkpoints in the directory are left alone and never used
    if isinstance(resume, (str, Path)):
        try:
            checkpoint, state = store.read(resume)
        except CheckpointError as exc:
            raise ValueError(f"Guard(resume={str(resume)!r}): {exc}") from None
        return _checked(checkpoint, state, job=job, run_dir=run_dir, explicit=True)
    store.adopt()
    newest = {c.step: c for c in store.checkpoints()}  # per step, the healthy one if both
    # Under torch.distributed every rank resumes from the same step: one every rank has and reads.
    for step in common_steps(list(newest)):
        try:
            state, ok = store.load(newest[step]), True
        except CheckpointError as exc:
            warnings.warn(f"spikedoc guard: cannot resume from {exc}; trying an older checkpoint", RuntimeWarning,
                          stacklevel=4)  # fmt: skip
            state, ok = None, False
        if agree_all(ok):
            return _checked(newest[step], state, job=job, run_dir=run_dir, explicit=resume is True)
    if resume:
        raise ValueError(f"Guard(resume=True): no readable guard checkpoint in {store.directory}")
    return None


def _checked(checkpoint: Checkpoint, state: Any, *, job: dict[str, Any], run_dir: Path,
             explicit: bool) -> tuple[Checkpoint, dict[str, Any]]:  # fmt: skip
    """Continue from `state` when asked for (`explicit`), or automatically only for the same job; loudly."""
    changed = differences(state["guard"].get("job"), job)
    where = f"{checkpoint.path} (step {checkpoint.step})"
    if changed and not explicit:
        raise ValueError(f"Guard: {run_dir} holds checkpoints of another job ({'; '.join(changed[:4])}): "
                         "pass resume=False to start fresh there (they are left alone and never loaded), "
                         "resume=True to continue them anyway, or another run_dir")  # fmt: skip
    if changed:
        message = f"spikedoc guard: resuming from {where} as asked, although the job differs: {'; '.join(changed[:4])}"
    else:
        message = (f"spikedoc guard: resuming from {where}: the same job (model, optimizer, hyperparameters) "
                   "stopped there; pass resume=False to start fresh")  # fmt: skip
    warnings.warn(message, RuntimeWarning, stacklevel=5)
    return checkpoint, state
