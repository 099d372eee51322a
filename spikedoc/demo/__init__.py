"""`spikedoc demo`: record a real training run with a planted fault, then diagnose it.

A tiny byte-level GPT trains on CPU on Python's own documentation for 300 steps with
`spikedoc.watch` recording every step; one fault of the spike suite is planted on the way. The run
lands in a directory the user can analyse again, so both halves of spikedoc are shown on a real run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["FAULTS", "GUARD_FAULTS", "DEFAULT_FAULT", "record_demo_run", "guarded_demo_run"]

#: Faulty runs of the spike suite the demo can plant (name -> what happens).
FAULTS = {
    "bad_batch_long": "a batch of 32 base64 blobs, 14x the usual sequence length, at step 170",
    "bad_batch_constant": "a batch of NUL bytes (a zero-filled shard) at step 140",
    "lr_jump": "the learning rate multiplied by 10 from step 160 (a scheduler restored wrongly)",
    "nan": "one weight element set to inf before step 200",
    "optimizer_state": "Adam's exp_avg_sq zeroed before step 150 (a lossy checkpoint converter)",
    "state_reset": "a resume at step 150 that never loaded the model and optimizer state",
}
DEFAULT_FAULT = "bad_batch_long"

#: Faults `spikedoc demo --guard` plants once under `spikedoc.Guard` (name -> what happens).
GUARD_FAULTS = {
    "bad_batch_long": "a batch of 32 base64 blobs at step 170; the guard vetoes it before its update",
    "optimizer_state": "Adam's exp_avg_sq zeroed before step 150; the guard sees the second moments collapse before "
                       "the update, vetoes the step and rolls back to step 100, replaying it as it was",
    "nan": "one weight element set to inf before step 200; every loss is NaN, the guard rolls back to the checkpoint "
           "of step 150 (the one of step 200 may already hold the damage: the loss of a step shows the update before it)",
}  # fmt: skip


def record_demo_run(run_dir: str | Path, fault: str = DEFAULT_FAULT,
                    on_step: Callable[[int, int], None] | None = None) -> Path:
    """Train the spike suite's run `fault` into `run_dir` (replaced if present) and return its path.

    Takes about 10 s on 2 CPU cores; checkpoints go to a temporary directory. `on_step(done, total)`
    is called after every step (the CLI's progress bar).

    Example:
        >>> record_demo_run("/tmp/demo-run", "lr_jump")  # doctest: +SKIP
        PosixPath('/tmp/demo-run')
    """
    from spikedoc.demo.training import SPECS, generate_run  # torch: only when a run is trained

    if fault not in FAULTS:
        raise ValueError(f"unknown demo fault {fault!r}; choose one of: {', '.join(FAULTS)}")
    spec = next(s for s in SPECS if s.name == fault)
    generate_run(spec, run_dir, on_step=on_step)
    return Path(run_dir)


def guarded_demo_run(run_dir: str | Path, fault: str = "optimizer_state") -> dict:
    """Train the demo GPT under `spikedoc.Guard` into `run_dir` with `fault` planted once; returns
    `{"steps", "vetoes", "rollbacks", "final_loss", "actions"}`. About 15 s on 2 CPU cores."""
    from spikedoc.demo.guarded import guarded_run  # torch: only when a run is trained

    return guarded_run(run_dir, fault)
