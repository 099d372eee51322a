"""Opening a run directory for a monitor: its segment agreed across ranks, meta.json, the start event."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

from spikedoc.monitor import meta as _meta
from spikedoc.monitor._plan import Plan
from spikedoc.monitor.config import WatchConfig
from spikedoc.monitor.distributed import agreed_segment
from spikedoc.store.writer import RunWriter

__all__ = ["open_run", "tensorboard_mirror"]


def open_run(writer: RunWriter, *, model: nn.Module, optimizers: list[Any], plan: Plan, config: WatchConfig,
             scaler: Any, scheduler: Any, start: int, fail: Callable[[str, BaseException], None]) -> int:  # fmt: skip
    """Describe the run in `meta.json` and record its start; the segment number, or -1 when the
    run directory is unusable (one warning through `fail`: training goes on unrecorded)."""
    try:  # rank 0 writes meta.json while the others read it: the first to open numbers the segment
        segment = agreed_segment(str(writer.run_dir.resolve()), writer.next_segment)
    except Exception as exc:  # noqa: BLE001
        segment = None
        fail("agree_segment", exc)
    try:
        exact = plan.update_exact()
        label = "exact" if all(exact) else "estimated" if not any(exact) else "mixed"
        watch_cfg = {**asdict(config), "scaler": type(scaler).__name__ if scaler is not None else None,
                     "update_norm": label}  # fmt: skip
        meta = _meta.describe(model, optimizers, plan.names, watch=watch_cfg, start_step=start,
                              update_exact=exact, scheduler=_meta.describe_scheduler(scheduler))
        if segment is not None:
            meta["segment"] = segment
        opened = writer.open(meta)
        writer.add_event("start", start, segment=opened)
        if opened > 0 and start == 0 and config.start_step is None:
            _warn_appended(writer, opened)
        return opened
    except Exception as exc:  # noqa: BLE001 - an unusable run dir must not stop training
        fail("open", exc)
        return -1


def _warn_appended(writer: RunWriter, segment: int) -> None:
    # A fresh optimizer in a directory that already holds a run: a resume that loaded no state, or a new
    # run written over an old one. Either way analyze will read both as one run, so say it at once.
    warnings.warn(
        f"spikedoc: {writer.run_dir} already holds a run (segments 0..{segment - 1}); this one is recorded as "
        f"segment {segment}, from step 0, and analyze reads them as one run. A resume: load the optimizer's state "
        "before watch() or pass watch(start_step=...); a new run: give it its own run_dir",
        UserWarning,
        stacklevel=4,
    )


def tensorboard_mirror(writer: RunWriter, logdir: str, model: nn.Module, plan: Plan,
                       fail: Callable[[str, BaseException], None]) -> None:  # fmt: skip
    """Mirror the rows to TensorBoard on the writer's thread; a failure here only warns."""
    try:
        from spikedoc.store.tensorboard_mirror import TensorBoardMirror

        root = _meta.unwrap(model)
        modules = dict(root.named_modules())
        types = {name: type(modules.get(name.rpartition(".")[0], root)).__name__ for name in plan.names}
        writer.mirror = TensorBoardMirror(logdir, types)
    except Exception as exc:  # noqa: BLE001
        fail("tensorboard", exc)
