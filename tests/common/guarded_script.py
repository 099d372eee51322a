"""A guarded training run as its own process, for kill-and-resume tests.

    python -m tests.common.guarded_script RUN_DIR --steps 100 [--nan 25-29] [--garbage 25-29]
        [--sleep-from 60] [--die-in-save-of 40]

Resumes automatically from RUN_DIR's checkpoints; writes the final parameters to RUN_DIR/final.pt.
`--die-in-save-of S` kills the process (SIGKILL) halfway through writing the checkpoint of step S.
`--garbage` makes the batches first drawn at those steps random tokens wherever they are read again.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import time
from pathlib import Path

import torch

from tests.common.guarded import build, garbage, loader


def _die_halfway_through_save(step: int) -> None:
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == step:
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--nan", default="", help="first-last step whose gradients are NaN on the first pass")
    parser.add_argument("--garbage", default="", help="first-last step whose batches are random tokens wherever read")
    parser.add_argument("--sleep-from", type=int, default=None)
    parser.add_argument("--die-in-save-of", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.die_in_save_of is not None:
        _die_halfway_through_save(args.die_in_save_of)
    nan, bad = (range(*(int(a) + i for i, a in enumerate(arg.split("-")))) if arg else range(0) for arg in (args.nan, args.garbage))
    corrupt: set[int] = set()  # sample ids of the batches first drawn at the `bad` steps

    import spikedoc

    model, opt, sched = build()
    guard = spikedoc.Guard(model, opt, scheduler=sched, data=loader(), run_dir=args.run_dir, checkpoint_every=20,
                           max_steps=args.steps, watch_options={"flush_every": 5})  # fmt: skip
    for step, batch in guard:
        ids = set(batch["idx"].tolist())
        if step in bad and not corrupt & ids and guard.rollbacks == 0 and not guard.skipped_positions:
            corrupt |= ids
        if ids <= corrupt:
            batch = garbage(batch, model.cfg.vocab_size)
        loss = model(batch["input_ids"], labels=batch["labels"]).loss * batch.get("loss_weight", 1.0)
        guard.record(loss=loss, sample_ids=batch["idx"])
        loss.backward()
        if step in nan and guard.rollbacks == 0:
            for p in model.parameters():
                p.grad.fill_(math.nan)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if args.sleep_from is not None and step >= args.sleep_from:
            time.sleep(0.05)
    guard.close()
    torch.save({"params": model.state_dict(), "rollbacks": guard.rollbacks, "lr_scale": guard.lr_scale,
                "clip": guard.clip, "skipped": guard.skipped_positions}, args.run_dir / "final.pt")  # fmt: skip


if __name__ == "__main__":
    main()
