"""Guard checkpoints: host copies of the training state, checked finite, written atomically, pruned.

A checkpoint of step s holds the state after steps 0..s-1 (the monitor's convention: resuming from
it runs step s next). Files are `step-<s>.pt` (`step-<s>.rank<r>.pt` under torch.distributed) in
`<run_dir>/checkpoints/`, written to a temporary name and renamed, so a crash mid-write leaves the
previous files intact. A checkpoint taken while an incident is open is named `.unhealthy.pt`: a
resume may continue from it, a rollback never returns to it. The file may be written by a
background thread while training goes on (one write at a time); the in-memory copy is a rollback
target at once, the file once it has landed.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spikedoc.errors import SpikedocError
from spikedoc.guard.payload import make_loadable, nonfinite_entries

__all__ = ["CheckpointError", "Checkpoint", "CheckpointStore", "host_copy", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_SECTIONS = ("model", "optimizer", "guard", "data", "rng")
_NAME = re.compile(r"^step-(\d+)(?:\.rank(\d+))?(\.unhealthy)?\.pt$")
# The temporary a write goes through (`_save`): a killed write leaves one behind.
_TEMPORARY = re.compile(r"^\.step-\d+(?:\.rank(\d+))?(?:\.unhealthy)?\.pt\.tmp-\d+$")


class CheckpointError(SpikedocError):
    """A checkpoint is unreadable, from another format, incomplete or holds non-finite values."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file (or the in-memory copy of one)."""

    step: int
    """Steps 0..step-1 are in it: training continues at `step`."""
    path: Path | None
    healthy: bool
    """No incident was open when it was taken: a rollback target."""


def host_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the host, detached from the live one.

    Device tensors are copied without a sync each; one synchronisation at the end makes the copies
    valid (a CPU tensor is cloned, since `.to("cpu")` would return the live tensor itself).
    """
    devices: set[torch.device] = set()

    def copy(x: Any) -> Any:
        if isinstance(x, Tensor):
            if x.device.type == "cpu":
                return x.detach().clone()
            devices.add(x.device)
            return x.detach().to("cpu", non_blocking=x.device.type == "cuda")
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(obj)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out


class CheckpointStore:
    """The guard's checkpoint files in one directory, plus the newest good one kept in memory.

    Example:
        >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)  # doctest: +SKIP
        >>> store.save(500, state, healthy=True).step  # doctest: +SKIP
        500
    """

    def __init__(self, directory: str | Path, *, keep: int, rank: int | None = None, in_memory: bool = True,
                 background: bool = False, buffers: dict[str, Tensor] | None = None) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.buffers = buffers or {}
        """Model buffers non-finite by design (`payload.buffer_patterns` at the start): allowed as they were."""
        self.coerced: list[str] = []
        """Entries of the last saved state that were numpy scalars, stored as Python numbers."""
        self.keep, self.rank, self.in_memory, self.background = keep, rank, in_memory, background
        self._memory: tuple[Checkpoint, dict[str, Any]] | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._writing: tuple[Checkpoint, Future[None]] | None = None
        self._landed: list[tuple[Checkpoint, BaseException | None]] = []
        self._mine: set[Path] = set()
        """Files this store wrote, or adopted from the directory (`adopt`): the only ones it uses, so
        a fresh run in a directory holding another run's checkpoints never returns to them."""
        self._remove_leftovers()

    # ---------------------------------------------------------------------------------- public

    def save(self, step: int, state: dict[str, Any], *, healthy: bool) -> Checkpoint:
        """Check `state` (a `host_copy`), write it atomically and prune old files.

        A state with a non-finite parameter or optimizer tensor, a buffer that became non-finite, or
        an entry `torch.load(weights_only=True)` could never rebuild is refused (CheckpointError,
        naming the entries) and nothing is written; numpy scalars are stored as Python numbers
        (`coerced` names them). A healthy state is kept in memory at once (`in_memory`). With `background` the
        file is written by a thread and this returns first (after the previous write has finished).
        Whether and when the file landed, or the OSError that stopped it: `landed()`.
        """
        self._check(state, where=f"state of step {step}")
        state, self.coerced, refused = make_loadable(state)
        if refused:
            raise CheckpointError(f"the state holds {', '.join(refused[:5])}: torch.load(weights_only=True) could "
                                  "never load it, so it is not written (store plain numbers, lists, dicts and "
                                  "tensors in the state_dicts)")  # fmt: skip
        healthy = bool(healthy)
        payload = {"format": CHECKPOINT_FORMAT, "step": int(step), "healthy": healthy, **state}
        checkpoint = Checkpoint(step=int(step), path=self._path(step, healthy), healthy=healthy)
        if healthy and self.in_memory:
            self._memory = (checkpoint, payload)
        self.wait()
        if not self.background:
            self._landed.append((checkpoint, _error_of(self._write, checkpoint, payload)))
            return checkpoint
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spikedoc-checkpoint")
        self._writing = (checkpoint, self._writer.submit(self._write, checkpoint, payload))
        return checkpoint

    @property
    def writing(self) -> bool:
        """A background write is under way or finished but not yet reported by `landed()`."""
        return self._writing is not None

    def landed(self) -> list[tuple[Checkpoint, BaseException | None]]:
        """The writes finished since the last call, in order: each checkpoint with the error that
        stopped its file (None: written). One still under way is left for a later call."""
        if self._writing is not None and self._writing[1].done():
            self.wait()
        landed, self._landed = self._landed, []
        return landed

    def wait(self) -> None:
        """Until the background write under way (if any) has finished; its outcome goes to `landed()`."""
        if self._writing is None:
            return
        checkpoint, future = self._writing
        self._writing = None
        self._landed.append((checkpoint, future.exception()))

    def close(self) -> None:
        """Finish the write under way and stop the writer thread (the outcome stays for `landed()`)."""
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None

    def load(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """The checked state of `checkpoint`: from memory when it is the copy kept there, else from disk.

        Raises CheckpointError when the file is unreadable, not a guard checkpoint of this format,
        incomplete, or holds a non-finite model or optimizer tensor.
        """
        if self._memory is not None and self._memory[0] == checkpoint:
            return self._memory[1]
        self.wait()
        if checkpoint.path is None:
            raise CheckpointError(f"checkpoint of step {checkpoint.step} was kept in memory only and is gone")
        payload = self._load(checkpoint.path)
        if payload.get("step") != checkpoint.step:
            raise CheckpointError(f"{checkpoint.path} holds step {payload.get('step')!r}, its name says {checkpoint.step}")
        return payload

    def read(self, path: str | Path) -> tuple[Checkpoint, dict[str, Any]]:
        """Any guard checkpoint file, checked as `load` checks this store's own (CheckpointError)."""
        payload = self._load(Path(path))
        return Checkpoint(step=int(payload["step"]), path=Path(path), healthy=bool(payload.get("healthy"))), payload

    def adopt(self) -> None:
        """Use this rank's checkpoint files already in the directory (a resume continues their run)."""
        self.wait()
        self._mine |= {c.path for c in self._on_disk()}

    def checkpoints(self) -> list[Checkpoint]:
        """This run's checkpoints (written or adopted) still on disk, plus the in-memory one, oldest
        first. Waits for a background write under way: its file is about to be one of them."""
        self.wait()
        found = [c for c in self._on_disk() if c.path in self._mine]
        if self._memory is not None and not any(c == self._memory[0] for c in found):
            found.append(self._memory[0])
        return sorted(found, key=lambda c: (c.step, c.healthy))

    def rollback_target(self, before: int) -> Checkpoint | None:
        """The newest healthy checkpoint of a step at or before `before`, or None."""
        good = [c for c in self.checkpoints() if c.healthy and c.step <= before]
        return good[-1] if good else None

    def forget_after(self, step: int) -> None:
        """Drop the checkpoints of steps after `step` (a rollback abandoned that branch)."""
        if self._memory is not None and self._memory[0].step > step:
            self._memory = None
        for c in self.checkpoints():
            if c.step > step and c.path is not None:
                self._delete(c.path)

    # --------------------------------------------------------------------------------- private

    def _remove_leftovers(self) -> None:
        """Delete the temporaries of this rank's writes that a killed process left (no write of this
        rank is under way yet: each rank has one store, and this one has just been made)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            m = _TEMPORARY.match(path.name)
            if m is not None and (int(m.group(1)) if m.group(1) is not None else None) == self.rank:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("spikedoc guard: could not delete the leftover %s (%s)", path, exc)

    def _on_disk(self) -> list[Checkpoint]:
        # Temporary files of an interrupted write do not match the name pattern.
        found = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.iterdir():
            m = _NAME.match(path.name)
            if m is None or (int(m.group(2)) if m.group(2) is not None else None) != self.rank:
                continue
            found.append(Checkpoint(step=int(m.group(1)), path=path, healthy=m.group(3) is None))
        return found

    def _write(self, checkpoint: Checkpoint, payload: dict[str, Any]) -> None:
        # On the writer thread when `background`: it alone touches the files until `wait()`.
        self._save(checkpoint.path, payload)
        self._mine.add(checkpoint.path)
        self._prune()

    def _path(self, step: int, healthy: bool) -> Path:
        rank = f".rank{self.rank}" if self.rank is not None else ""
        return self.directory / f"step-{step:08d}{rank}{'' if healthy else '.unhealthy'}.pt"

    def _save(self, path: Path, payload: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _delete(self, path: Path) -> None:
        """Remove the checkpoint whose file is `path` (a sharded store removes its shards too)."""
        path.unlink(missing_ok=True)

    def _load(self, path: Path) -> dict[str, Any]:
        payload = self._read_file(path)
        self._check(payload, where=str(path))
        return payload

    def _read_file(self, path: Path) -> dict[str, Any]:
        """The payload of the file at `path`, unchecked (CheckpointError when unreadable or of another format)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: no such checkpoint") from exc
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a corrupt file
            raise CheckpointError(f"{path} is not a readable guard checkpoint ({type(exc).__name__}: {exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path} is not a guard checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
        return payload

    def _check(self, state: dict[str, Any], *, where: str) -> None:
        missing = [k for k in _SECTIONS if k not in state]
        if missing:
            raise CheckpointError(f"{where} lacks {', '.join(missing)}: not a complete guard checkpoint")
        bad = nonfinite_entries(state, self.buffers)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise CheckpointError(f"{where} holds NaN or inf in the model or optimizer state ({', '.join(bad[:3])}{more}): "
                                  "never a rollback target")  # fmt: skip

    def _prune(self) -> None:
        # Keep the newest `keep` healthy files, and unhealthy ones only while newer than all of them
        # (a resume may need one; a rollback never does). Files only: not `checkpoints()`, which waits.
        found = sorted((c for c in self._on_disk() if c.path in self._mine), key=lambda c: (c.step, c.healthy))
        healthy = [c for c in found if c.healthy]
        kept = set(healthy[-self.keep :])
        newest = healthy[-1].step if healthy else -1
        for c in found:
            if c not in kept and (c.healthy or c.step <= newest):
                try:
                    self._delete(c.path)
                except OSError as exc:
                    log.warning("spikedoc guard: could not delete old checkpoint %s (%s)", c.path, exc)


def _error_of(fn: Any, *args: Any) -> BaseException | None:
    """Run `fn(*args)`: None, or the OSError that stopped it (a full disk, a bad directory)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc
    return None
