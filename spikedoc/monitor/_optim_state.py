"""State statistics of optimizers without a closed-form update: Muon, Adafactor, Lion, 8-bit Adam, Schedule-Free, SOAP/Shampoo.

Their update norms come from `SampledStats`' snapshot of the parameters (exact for every tensor the
snapshot copies whole, estimated for the rest; `update_exact` says which); each class adds what
its optimizer's state means.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor

from spikedoc.monitor._optim import AdamStats, AfterStep, Bucket, OptimizerStats, SampledStats, SgdStats
from spikedoc.monitor.statistics import norms

__all__ = ["MuonStats", "AdafactorStats", "LionStats", "Bnb8bitStats", "ScheduleFreeStats", "PreconditionedStats",
           "dequantize_blockwise", "for_optimizer"]


def _per_param(bucket: Bucket, values: dict[int, Tensor]) -> Tensor:
    """Per-parameter values at positions `values` (0-dim tensors), NaN elsewhere, as one vector."""
    if not values:
        return torch.full((len(bucket.params),), math.nan, device=bucket.device)
    have = sorted(values)
    return bucket.expand(torch.stack([values[j].float() for j in have]), have if len(have) < len(bucket.params) else None,
                         math.nan)  # fmt: skip


class MuonStats(SampledStats):
    """`torch.optim.Muon`: the momentum buffer's norm; the orthogonalized update's norm from the snapshot.

    Muon's step reads the gradient without changing it (its Nesterov blend is out of place), so the
    gradient statistics may wait until after the step.
    """

    columns = ("momentum_norm",)
    step_keeps_grads = True

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, step.snapshot)}
        if step.layers:
            state = self.optimizer.state
            bufs = {j: state[p]["momentum_buffer"] for j, p in enumerate(bucket.params)
                    if "momentum_buffer" in state.get(p, {})}  # fmt: skip
            have = sorted(bufs)
            out["momentum_norm"] = _per_param(bucket, dict(zip(have, norms([bufs[j] for j in have]).unbind()))) \
                if have else _per_param(bucket, {})  # fmt: skip
        return out


class AdafactorStats(SampledStats):
    """`torch.optim.Adafactor`: the factored second moment and the estimate the step divides by.

    A matrix keeps row and column means of the squared gradient (`row_var` (..., R, 1), `col_var`
    (..., 1, C)); the step divides by `v = row_var @ col_var / max(mean(row_var), eps1)`. Its mean
    and maximum follow from the factors without forming `v`: mean(v) = mean(col_var) *
    mean(row_var) / max(mean(row_var), eps1), max(v) = max(row_var) * max(col_var) /
    max(mean(row_var), eps1) per matrix (all factors are non-negative). A vector keeps `variance`.
    """

    columns = ("row_var_mean", "col_var_mean", "var_mean", "var_max")
    step_keeps_grads = True

    def hyperparameters(self) -> dict[int, float | None]:
        return {g: group["eps"][0] for g, group in enumerate(self.optimizer.param_groups)}

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, step.snapshot)}
        if not step.layers:
            return out
        got: dict[str, dict[int, Tensor]] = {k: {} for k in self.columns}
        for j, p in enumerate(bucket.params):
            s = self.optimizer.state.get(p, {})
            if "row_var" in s:
                row, col = s["row_var"].float(), s["col_var"].float()  # (..., R, 1), (..., 1, C)
                eps1 = step.hyper.get(bucket.groups[j]) if step.hyper else None
                eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
                row_mean = row.mean(dim=-2, keepdim=True).clamp(min=eps1)  # (..., 1, 1)
                got["row_var_mean"][j], got["col_var_mean"][j] = row.mean(), col.mean()
                got["var_mean"][j] = (col.mean(dim=-1, keepdim=True) * row.mean(dim=-2, keepdim=True) / row_mean).mean()
                got["var_max"][j] = (row.amax(dim=-2, keepdim=True) * col.amax(dim=-1, keepdim=True) / row_mean).max()
            elif "variance" in s:
                got["var_mean"][j], got["var_max"][j] = s["variance"].float().mean(), s["variance"].float().max()
        out.update({key: _per_param(bucket, vals) for key, vals in got.items()})
        return out


class LionStats(SampledStats):
    """`lion_pytorch.Lion`: the momentum's norm and the share of coordinates whose update sign flipped.

    Lion moves each coordinate by `-lr * sign(beta1 * m + (1 - beta1) * g)` with `m` from before
    the step. `before` copies `m`; `after` forms the same sign with the same float operations
    and counts coordinates whose sign is opposite to the last measured step's (`sign_flip_frac`:
    flips / elements; NaN until a previous sign exists).
    """

    columns = ("momentum_norm", "sign_flip_frac")
    step_keeps_grads = True
    reads_grads_after = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, budget: int) -> None:
        super().__init__(optimizer, budget=budget)
        # The last measured update sign of each tensor, by (bucket, position): int8, one byte per element.
        self._signs: dict[tuple[int, int], Tensor] = {}

    def hyperparameters(self) -> dict[int, float]:
        return {g: float(group["betas"][0]) for g, group in enumerate(self.optimizer.param_groups)}

    def before(self, bucket: Bucket, grads: list[Tensor], active: list[int] | None) -> Any:
        state = self.optimizer.state
        moments = {j: state[p]["exp_avg"].clone() for j, p in enumerate(bucket.params) if "exp_avg" in state.get(p, {})}
        return super().before(bucket, grads, active), moments

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        snapshot, moments = step.snapshot
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, snapshot)}
        state, active = self.optimizer.state, set(step.active if step.active is not None else range(len(bucket.params)))
        flips: dict[int, Tensor] = {}
        for j in sorted(active):
            if j not in moments and "exp_avg" not in state.get(bucket.params[j], {}):
                continue
            # Lion's first step starts from a zero momentum (it creates `exp_avg` inside step()).
            m_old = moments[j] if j in moments else torch.zeros_like(step.grads[j])
            beta1 = step.hyper[bucket.groups[j]]
            sign = m_old.mul_(beta1).add_(step.grads[j], alpha=1.0 - beta1).sign_()  # as Lion computes it
            prev = self._signs.get((id(bucket), j))
            if prev is not None:
                flips[j] = (sign * prev < 0).sum(dtype=torch.float32) / max(sign.numel(), 1)
            self._signs[(id(bucket), j)] = sign.to(torch.int8)
        if step.layers:
            have = [j for j, p in enumerate(bucket.params) if "exp_avg" in state.get(p, {})]
            vals = dict(zip(have, norms([state[bucket.params[j]]["exp_avg"] for j in have]).unbind())) if have else {}
            out["momentum_norm"] = _per_param(bucket, vals)
            out["sign_flip_frac"] = _per_param(bucket, flips)
        return out


def dequantize_blockwise(codes: Tensor, qmap: Tensor, absmax: Tensor, blocksize: int = 256) -> Tensor:
    """bitsandbytes' blockwise 8-bit state as float32: `qmap[code] * absmax[block]`, in the tensor's shape.

    Example:
        >>> codes = torch.tensor([0, 255], dtype=torch.uint8)
        >>> dequantize_blockwise(codes, torch.linspace(-1, 1, 256), torch.tensor([2.0])).tolist()
        [-2.0, 2.0]
    """
    n = codes.numel()
    flat = qmap[codes.reshape(-1).long()]  # (n,) in [-1, 1]
    blocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * absmax.float().view(blocks, 1)).reshape(-1)[:n].view(codes.shape)


class Bnb8bitStats(SampledStats):
    """bitsandbytes' 8-bit optimizers: statistics of the dequantized moments.

    `state1` (the first moment) and `state2` (the second, Adam-type optimizers only) are uint8 codes
    into `qmap1`/`qmap2` scaled per block of 256 elements by `absmax1`/`absmax2`; tensors below
    `min_8bit_size` keep them in float32. Columns as Adam's: `exp_avg_norm`, `exp_avg_sq_mean`,
    `exp_avg_sq_max`.
    """

    columns = ("exp_avg_norm", "exp_avg_sq_mean", "exp_avg_sq_max")

    @staticmethod
    def moment(state: dict[str, Any], k: int) -> Tensor | None:
        """Moment `k` (1 or 2) of one parameter as float32, dequantized when stored in 8 bits."""
        t = state.get(f"state{k}")
        if not isinstance(t, Tensor):
            return None
        if t.dtype == torch.uint8:
            return dequantize_blockwise(t, state[f"qmap{k}"], state[f"absmax{k}"])
        return t.float()

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, step.snapshot)}
        if not step.layers:
            return out
        got: dict[str, dict[int, Tensor]] = {k: {} for k in self.columns}
        for j, p in enumerate(bucket.params):
            s = self.optimizer.state.get(p, {})
            m, v = self.moment(s, 1), self.moment(s, 2)
            if m is not None:
                got["exp_avg_norm"][j] = m.norm()
            if v is not None:
                got["exp_avg_sq_mean"][j], got["exp_avg_sq_max"][j] = v.mean(), v.max()
        out.update({key: _per_param(bucket, vals) for key, vals in got.items()})
        return out


class ScheduleFreeStats(SampledStats):
    """Schedule-Free optimizers (`schedulefree`): which sequence is measured, the averaging weight, `z`.

    In train mode the parameters hold `y` (the gradient's evaluation point), in eval mode `x` (the
    average); `optimizer.step()` only runs in train mode, so the update norm is that of `y`. Step
    columns (param group 0): `sf_train_mode` (1.0 when the parameters held `y` after the step) and
    `sf_averaging_weight`, the weight `c = w_t / sum w` with which the step moved `x` toward `z`
    (`w_t = t**r * lr_max**weight_lr_power`). Layer columns: `z_norm`, and with the AdamW variant
    `exp_avg_sq_mean` and `exp_avg_sq_max`. `optimizer.eval()` swaps the parameters in place right
    after a step, so the post-step statistics end in the step hook.
    """

    columns = ("z_norm", "exp_avg_sq_mean", "exp_avg_sq_max")

    def hyperparameters(self) -> dict[str, float]:
        g = self.optimizer.param_groups[0]
        k = float(g["k"])  # steps taken, counting this one
        weight = (k ** float(g["r"])) * float(g["lr_max"]) ** float(g["weight_lr_power"])
        total = float(g["weight_sum"])
        return {"sf_train_mode": 1.0 if g["train_mode"] else 0.0, "sf_averaging_weight": weight / total if total else 0.0}

    def step_values(self, hyper: Any) -> dict[str, float]:
        return dict(hyper) if hyper else {}

    def after(self, bucket: Bucket, step: AfterStep) -> dict[str, Tensor]:
        out = {"update_norm": self._snapshot(bucket).update_norms(bucket.params, step.snapshot)}
        if not step.layers:
            return out
        got: dict[str, dict[int, Tensor]] = {k: {} for k in self.columns}
        for j, p in enumerate(bucket.params):
            s = self.optimizer.state.get(p, {})
            if "z" in s:
                got["z_norm"][j] = s["z"].float().norm()
            if "exp_avg_sq" in s:
                got["exp_avg_sq_mean"][j], got["exp_avg_sq_max"][j] = s["exp_avg_sq"].float().mean(), s["exp_avg_sq"].max()
        out.update({key: _per_param(bucket, vals) for key, vals in got.items()})
        return out


#: State keys of a preconditioner that is recomputed every few steps: SOAP's eigenbases `Q`,
#: Shampoo's inverse roots `inv_pre_cond_<dim>` (pytorch-optimizer's names), and heavyball's
#: nested `<n>.scale_by_soap_Q_<k>`.
_PRECONDITIONER = re.compile(r"(^|[._])(Q(_\d+)?|inv_[^.]*)$")


class PreconditionedStats(SampledStats):
    """SOAP and Shampoo: every state tensor's norm, and the steps that recomputed the preconditioner.

    Step column `precond_refreshed`: tensors whose preconditioner (`Q`, `inv_*` state) was
    replaced or written since the previous step, seen by object identity and version counter,
    read right after the step on the training thread (no tensor is read).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, budget: int) -> None:
        super().__init__(optimizer, budget=budget)
        self._last: dict[int, tuple[Any, ...]] = {}

    def hyperparameters(self) -> dict[int, tuple[Any, ...]]:
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out[id(p)] = _signature(self.optimizer.state.get(p, {}))
        return out

    def step_values(self, hyper: Any) -> dict[str, float]:
        if hyper is None:
            return {}
        changed = sum(1 for key, sig in hyper.items() if sig and self._last.get(key) != sig)
        self._last = dict(hyper)
        return {"precond_refreshed": float(changed)}


def _signature(state: Any, prefix: str = "") -> tuple[Any, ...]:
    """(key, id, version) of each preconditioner tensor in one parameter's (possibly nested) state."""
    out: list[Any] = []
    for key, value in state.items() if isinstance(state, dict) else ():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _signature(value, f"{name}.")
        elif _PRECONDITIONER.search(str(name)):
            items = value if isinstance(value, (list, tuple)) else [value]
            out += [(name, id(t), t._version) for t in items if isinstance(t, Tensor)]
    return tuple(out)


def for_optimizer(optimizer: torch.optim.Optimizer, *, sample_budget: int, snapshot: bool = False) -> OptimizerStats:
    """The statistics implementation for `optimizer`: exact for torch's Adam, AdamW and SGD.

    A subclass that overrides `step` may change the update rule, so it gets the sampled estimate.
    Muon, Adafactor, Lion, bitsandbytes' 8-bit optimizers, Schedule-Free and SOAP/Shampoo get their
    own state statistics (`_optim_state.py`) with sampled update norms; anything else the generic
    ones. `snapshot`: the parameters fit the temporary budget, so Adam may copy them before each step.
    """
    cls = type(optimizer)
    step = cls.step
    if step in (torch.optim.Adam.step, torch.optim.AdamW.step):
        return AdamStats(optimizer, snapshot=snapshot)
    if step is torch.optim.SGD.step:
        return SgdStats(optimizer)
    for name, stats in (("Muon", MuonStats), ("Adafactor", AdafactorStats)):
        if hasattr(torch.optim, name) and step is getattr(torch.optim, name).step:
            return stats(optimizer, budget=sample_budget)
    module = cls.__module__.split(".")[0]
    if module == "lion_pytorch" and cls.__name__ == "Lion":
        return LionStats(optimizer, budget=sample_budget)
    if module == "bitsandbytes" and hasattr(optimizer, "name2qmap"):
        return Bnb8bitStats(optimizer, budget=sample_budget)
    if module == "schedulefree" and all("train_mode" in g for g in optimizer.param_groups):
        return ScheduleFreeStats(optimizer, budget=sample_budget)
    if re.search(r"soap|shampoo", cls.__name__, re.IGNORECASE):
        return PreconditionedStats(optimizer, budget=sample_budget)
    return SampledStats(optimizer, budget=sample_budget)
