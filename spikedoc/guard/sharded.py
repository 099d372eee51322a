"""The guard under FSDP2 (`fully_shard`): the global gradient norm, and sharded checkpoints written
with `torch.distributed.checkpoint` (DCP).

Under FSDP2 parameters, gradients and optimizer state are DTensors holding one shard per rank.

- **The norm.** Each rank's share of the squared global gradient norm is the sum of its shards'
  squared norms, plus, on rank 0 alone, those of the tensors that are not split (the rule the
  monitor combines full-tensor statistics with). The guard's one all_reduce per step sums the
  shares (`agree(..., sharded=True)`): the root is the norm of the full gradient, with no
  collective and no host sync of its own.
- **The state.** A checkpoint's model and optimizer entries are each rank's own shards (local
  tensors, copied to the host like any state), taken with `get_model_state_dict` and
  `get_optimizer_state_dict` and put back by `set_model_state_dict` and `set_optimizer_state_dict`
  as DTensors rebuilt on the parameters' mesh and placements. `sharded` lists which entries were
  DTensors, with their full shapes. No rank ever holds another rank's shards.
- **The files.** `ShardedCheckpointStore` writes the shards of all ranks to one DCP directory per
  checkpoint (`step-<s>.dcp/`) and the rest of each rank's state (random generators, data position,
  the guard's own state, the layout of the shards) to its rank file as before; the rank file is
  written after the DCP directory is complete, so a rank file means its shards landed. Whether a
  state is finite is agreed across ranks: one rank's NaN makes the checkpoint no rollback target on
  any rank.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spikedoc.guard.agree import agree_all, world
from spikedoc.guard.checkpoint import CheckpointError, CheckpointStore
from spikedoc.monitor.distributed import is_sharded, local

__all__ = ["is_fsdp", "GlobalNorm", "clip_shards", "training_state", "load_training_state",
           "ShardedCheckpointStore", "checkpoint_store"]  # fmt: skip

_RANK_FILE = re.compile(r"\.rank\d+(\.unhealthy)?\.pt$")


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` trains under torch.distributed with parameters split over ranks (FSDP2)."""
    return world() is not None and any(is_sharded(p) for p in model.parameters())


class GlobalNorm:
    """This rank's share of the squared global gradient norm, from the monitor's per-tensor norms.

    Example:
        >>> norm = GlobalNorm(rank=0)  # doctest: +SKIP
        >>> agree(loss, norm.share(*monitor.tensor_grad_norms()), rollback_request=False, sharded=True)  # doctest: +SKIP
    """

    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self._mask: tuple[list[int], Tensor] | None = None  # (parameter ids, weight per tensor), cached

    def share(self, norms: Tensor, params: list[Tensor]) -> Tensor:
        """Sum of the squared norms (`norms`, one per tensor of `params`, on the device) of this
        rank's shards, plus on rank 0 those of the tensors every rank holds whole. No host sync."""
        ids = [id(p) for p in params]
        if self._mask is None or self._mask[0] != ids or self._mask[1].device != norms.device:
            # Replicated tensors count once: rank 0's, as the monitor's combined statistics do.
            weights = [1.0 if is_sharded(p) or self.rank == 0 else 0.0 for p in params]
            self._mask = (ids, torch.tensor(weights, dtype=torch.float32, device=norms.device))
        return (norms.float().square() * self._mask[1]).sum()


def clip_shards(params: list[Tensor], total_norm: float, max_norm: float, *, observer: Any = None) -> float:
    """Scale the gradients of `params` (their local shards) as `clip_grad_norm_(params, max_norm)`
    would for the full gradients, given their agreed global norm; returns the coefficient.

    The norm is already on the host (agreed before the step): no collective and no sync here.
    `observer` (a `ClipObserver`: the monitor) is told of the clip as of a loop's own, so the run
    records its coefficient and max norm.
    """
    coef = min(max_norm / (total_norm + 1e-6), 1.0)  # torch's own clip coefficient, clamped at 1
    if coef < 1.0:
        grads = [local(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    if observer is not None:
        observer.after_clip(params, max_norm, torch.tensor(total_norm))
    return coef


# ------------------------------------------------------------------------------ state dicts


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The `model` and `optimizer` entries of a checkpoint; under FSDP2, each rank's own shards
    (local tensors, not yet copied) and `sharded`, the entries that were DTensors."""
    if not is_fsdp(model):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if optimizer.state:
        optim = get_optimizer_state_dict(model, optimizer)
    else:  # before the first step: get_optimizer_state_dict would make the state with a step of zero
        # gradients (Adam's step count then 1); a fresh optimizer's state is empty, so is this one's
        optim = {"state": {}, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]}
    sharded: list[list[Any]] = []
    state = {"model": _locals(get_model_state_dict(model), ["model"], sharded),
             "optimizer": {"state": _locals(optim["state"], ["optimizer", "state"], sharded),
                           "param_groups": optim["param_groups"]}}  # fmt: skip
    return {**state, "sharded": sharded}


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put the `model` and `optimizer` entries of `state` (`training_state`, copied) back, copying."""
    if "sharded" not in state:
        model.load_state_dict(state["model"])
        # The optimizer keeps the tensors it is given when they are on its parameters' device and
        # dtype already (a CPU run): cloned, so that training on never writes into the kept state.
        saved = state["optimizer"]
        optimizer.load_state_dict({**saved, "state": _map_tensors(saved["state"], lambda t: t.clone())})
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    full = as_dtensors(state, model, copy=True)
    set_model_state_dict(model, full["model"])
    saved = state["optimizer"]
    if saved["state"]:
        set_optimizer_state_dict(model, optimizer, {"state": full["optimizer"]["state"], "param_groups": saved["param_groups"]})
        return
    optimizer.state.clear()  # as a fresh optimizer: the first step makes its state (Adam: bias correction from 1)
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in hyper.items() if k != "params"})


def as_dtensors(state: dict[str, Any], model: nn.Module, *, copy: bool) -> dict[str, Any]:
    """`state`'s model and optimizer entries with each of its `sharded` local tensors wrapped as the
    DTensor it came from (the mesh and placements of the parameter of its name, its full shape),
    on the parameter's device; every other tensor on the host as it is (`copy`: copies of both)."""
    params = dict(model.named_parameters())
    out = {"model": dict(state["model"]),
           "optimizer": {"state": {k: dict(v) for k, v in state["optimizer"]["state"].items()}}}  # fmt: skip
    if copy:
        out = _map_tensors(out, lambda t: t.clone())
    from torch.distributed.tensor import DTensor

    for *keys, shape in state["sharded"]:
        parent = out
        for key in keys[:-1]:
            parent = parent[key]
        owner = params[keys[2] if keys[0] == "optimizer" else keys[1]]
        shard = parent[keys[-1]].to(owner.device)
        parent[keys[-1]] = DTensor.from_local(shard, owner.device_mesh, owner.placements, run_check=False,
                                              shape=torch.Size(shape), stride=_contiguous_stride(shape))  # fmt: skip
    return out


def _locals(tree: Any, path: list[Any], sharded: list[list[Any]]) -> Any:
    """`tree` with each DTensor replaced by its local shard, its path and full shape noted in `sharded`."""
    if isinstance(tree, dict):
        return {k: _locals(v, [*path, k], sharded) for k, v in tree.items()}
    if isinstance(tree, Tensor) and local(tree) is not tree:
        sharded.append([*path, list(tree.shape)])
        return local(tree).detach()
    return tree


def _map_tensors(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return fn(tree) if isinstance(tree, Tensor) else tree


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


# ---------------------------------------------------------------------------------- the files


class ShardedCheckpointStore(CheckpointStore):
    """The guard's checkpoints under FSDP2: the shards of every rank in one DCP directory per
    checkpoint, beside each rank's file; the in-memory copy is this rank's shards only.

    Every method that touches the files is a collective here (DCP's save and load, the agreed
    finiteness check): every rank calls it at the same point, as the guard's agreed decisions do.
    """

    def __init__(self, directory: str | Path, *, model: nn.Module, **options: Any) -> None:
        super().__init__(directory, **options)
        self._model = model

    def shards_of(self, path: Path) -> Path:
        """The DCP directory holding the shards of the checkpoint whose rank file is `path`."""
        return path.with_name(_RANK_FILE.sub(lambda m: f"{m.group(1) or ''}.dcp", path.name))

    def _save(self, path: Path, payload: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        self.directory.mkdir(parents=True, exist_ok=True)
        # DCP writes its metadata last (coordinator, after every rank's shards): a killed write
        # leaves a directory no rank file points to, never read.
        dcp.save(as_dtensors(payload, self._model, copy=False), checkpoint_id=self.shards_of(path))
        layout = {"model": _map_tensors(payload["model"], _meta),
                  "optimizer": {**payload["optimizer"], "state": _map_tensors(payload["optimizer"]["state"], _meta)}}  # fmt: skip
        super()._save(path, {**payload, **layout})

    def _load(self, path: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        error: CheckpointError | None = None
        try:
            payload = self._read_file(path)
        except CheckpointError as exc:
            error = exc
        if not agree_all(error is None):  # every rank reads the shards, or none (DCP's load is a collective)
            raise error or CheckpointError(f"{path}: another rank's file of this checkpoint is unreadable")
        where = self.shards_of(path)
        payload = {**payload, "model": _map_tensors(payload["model"], _empty),
                   "optimizer": {**payload["optimizer"], "state": _map_tensors(payload["optimizer"]["state"], _empty)}}  # fmt: skip
        target = as_dtensors(payload, self._model, copy=False)
        try:
            dcp.load(target, checkpoint_id=where)
        except Exception as exc:  # noqa: BLE001 - DCP raises its own kinds, the same on every rank
            raise CheckpointError(f"{where}: the shards are not readable ({type(exc).__name__}: {exc})") from exc
        loaded = _map_tensors(target, lambda t: local(t).detach().cpu())
        payload = {**payload, "model": loaded["model"],
                   "optimizer": {**payload["optimizer"], "state": loaded["optimizer"]["state"]}}  # fmt: skip
        self._check(payload, where=str(path))
        return payload

    def _check(self, state: dict[str, Any], *, where: str) -> None:
        error: CheckpointError | None = None
        try:
            super()._check(state, where=where)
        except CheckpointError as exc:
            error = exc
        if not agree_all(error is None):  # one rank's non-finite shard spoils the checkpoint for all
            raise error or CheckpointError(f"{where}: another rank's shards hold NaN or inf: never a rollback target")

    def _delete(self, path: Path) -> None:
        super()._delete(path)
        if self.rank in (None, 0):  # every rank drops its own file; rank 0 the shared shards
            shutil.rmtree(self.shards_of(path), ignore_errors=True)


def _meta(t: Tensor) -> Tensor:
    """A tensor's layout without its data (the rank file says what the DCP directory holds)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _empty(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype)


def checkpoint_store(model: nn.Module, directory: str | Path, **options: Any) -> CheckpointStore:
    """The guard's checkpoint store for `model`: sharded (DCP) under FSDP2, else whole state dicts."""
    if is_fsdp(model):
        return ShardedCheckpointStore(directory, model=model, **options)
    return CheckpointStore(directory, **options)
