"""Step and layer tables of a healthy run, to plant fault patterns in, written as real run dirs.

The curves follow what tiny transformer runs record: a loss decaying toward a floor with ~1% noise,
a log-normal gradient norm, a linear-warmup-then-cosine LR, Adam statistics per tensor. Tests plant
one fault pattern each and write the tables through the real `RunWriter`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spikedoc.store.writer import RunWriter

__all__ = ["NAMES", "MODULE_TYPES", "healthy_steps", "healthy_layers", "adamw_meta", "write_run"]

#: Parameter tensors of the synthetic model, one per module kind (and a second attention/mlp one).
NAMES = (
    "embed.weight",
    "h.0.ln_1.weight",
    "h.0.attn.qkv.weight",
    "h.0.attn.proj.weight",
    "h.0.mlp.fc.weight",
    "h.0.mlp.proj.weight",
    "h.0.mlp.proj.bias",
    "head.weight",
)
MODULE_TYPES = {
    "embed.weight": "Embedding",
    "h.0.ln_1.weight": "LayerNorm",
    "h.0.attn.qkv.weight": "Linear",
    "h.0.attn.proj.weight": "Linear",
    "h.0.mlp.fc.weight": "Linear",
    "h.0.mlp.proj.weight": "Linear",
    "h.0.mlp.proj.bias": "Linear",
    "head.weight": "Linear",
}


def healthy_steps(n: int = 600, *, seed: int = 0, warmup: int = 50, lr: float = 1e-3, start: int = 0,
                  loss0: float = 5.0, floor: float = 2.0, batch: int = 8, seq: int = 128) -> pd.DataFrame:  # fmt: skip
    """A clean step table of `n` steps starting at `start`, with batch fingerprints."""
    rng = np.random.default_rng(seed)
    step = np.arange(start, start + n)
    loss = floor + (loss0 - floor) * np.exp(-step / 150.0)
    loss = loss * np.exp(rng.normal(0, 0.01, n))
    if warmup:
        ramp = np.minimum(1.0, (step + 1) / warmup)
    else:
        ramp = np.ones(n)
    total = max(start + n, 1000)
    decay = 0.1 + 0.9 * 0.5 * (1 + np.cos(math.pi * np.clip((step - warmup) / (total - warmup), 0, 1)))
    lrs = lr * ramp * np.where(step < warmup, 1.0, decay)
    grad = 0.5 * np.exp(rng.normal(0, 0.1, n))  # below the 1.0 clip: healthy steps are never clipped
    ratio = rng.normal(0.6, 0.02, n)
    seq_median = rng.normal(100, 4, n)
    frame = pd.DataFrame({
        "step": step,
        "time": 1.7e9 + step.astype(float),
        "loss": loss,
        "micro_batches": 1,
        "lr": lrs,
        "grad_norm": grad,
        "clip_coef": 1.0,
        "param_norm": 50.0,
        "update_norm": lrs * 40 * np.exp(rng.normal(0, 0.05, n)),
        "nonfinite_grads": 0,
        "samples": batch,
        "tokens": batch * seq,
        "sample_offset": step * batch,
        "batch_hash": [f"{seed:04x}{s:012x}" for s in step],
        "seq_len_min": seq_median - 30,
        "seq_len_median": seq_median,
        "seq_len_max": np.minimum(seq, seq_median + 25),
        "distinct_token_ratio": ratio,
    })
    frame["sample_ids"] = [[f"doc-{s * batch + i}" for i in range(batch)] for s in step]
    frame["sample_losses"] = [list(l * np.exp(rng.normal(0, 0.05, batch))) for l in loss]
    return frame


def healthy_layers(steps: pd.DataFrame, *, seed: int = 1, names: Iterable[str] = NAMES) -> pd.DataFrame:
    """Per-tensor rows for every step of `steps`, consistent with its grad norm and LR."""
    rng = np.random.default_rng(seed)
    names = list(names)
    n, k = len(steps), len(names)
    base = np.linspace(0.1, 0.6, k)
    grad = base[None, :] * steps["grad_norm"].to_numpy()[:, None] * np.exp(rng.normal(0, 0.08, (n, k)))
    lr = steps["lr"].to_numpy()[:, None] / steps["lr"].max()
    ratio = 1e-3 * lr * np.exp(rng.normal(0, 0.08, (n, k)))
    # Adam's second moment is a running average (beta2 0.95): from step to step it shrinks by at most
    # beta2, as a real one does, around its level base^2 * 1e-4.
    fresh = (base[None, :] ** 2) * 1e-4 * np.exp(rng.normal(0, 0.2, (n, k)))
    v = np.empty((n, k))
    v[0] = (base ** 2) * 1e-4
    for i in range(1, n):
        v[i] = 0.95 * v[i - 1] + 0.05 * fresh[i]
    return pd.DataFrame({
        "step": np.repeat(steps["step"].to_numpy(), k),
        "name": names * n,
        "grad_norm": grad.ravel(),
        "grad_max": grad.ravel() / 5,
        "param_norm": 10.0,
        "update_norm": (ratio * 10.0).ravel(),
        "update_ratio": ratio.ravel(),
        "nonfinite": 0,
        "exp_avg_norm": grad.ravel() * 0.5,
        "exp_avg_sq_mean": v.ravel(),
        "exp_avg_sq_max": v.ravel() * 20,
        "eps_frac": np.clip(rng.normal(0.002, 0.0005, n * k), 0, 1),
    })


def adamw_meta(**overrides: Any) -> dict[str, Any]:
    """meta.json as the monitor writes it: AdamW, decay on matrices only, clip 1.0, beta2 0.95."""
    matrices = [n for n in NAMES if n.endswith("weight") and MODULE_TYPES[n] != "LayerNorm"]
    rest = [n for n in NAMES if n not in matrices]
    group = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "amsgrad": False, "maximize": False}
    meta: dict[str, Any] = {
        "spikedoc_version": "0.1.0",
        "world_size": 1,
        "rank": 0,
        "model": {"class": "Tiny", "num_parameters": 16 * len(NAMES)},
        "parameters": [
            {"name": n, "shape": [4, 4], "numel": 16, "dtype": "float32", "module": MODULE_TYPES[n],
             "group": int(n in rest), "requires_grad": True}
            for n in NAMES
        ],
        "optimizer": {
            "class": "torch.optim.adamw.AdamW",
            "groups": [{**group, "weight_decay": 0.1, "params": matrices}, {**group, "weight_decay": 0.0, "params": rest}],
            "weight_decay_params": matrices,
        },
        "watch": {"every": 1, "layer_every": 1, "clip": 1.0, "scaler": None, "flush_every": 100},
    }
    meta.update(overrides)
    return meta


def write_run(path: Path, steps: pd.DataFrame, layers: pd.DataFrame | None = None, *,
              meta: dict[str, Any] | None = None, events: Iterable[tuple[str, int, dict[str, Any]]] = (),
              rank: int = 0, segment: int | None = None) -> Path:  # fmt: skip
    """Write one segment of one rank through `RunWriter`; call again to append a segment or a rank."""
    writer = RunWriter(path, rank=rank, flush_every=10_000)
    info = dict(meta if meta is not None else adamw_meta())
    if segment is not None:
        info["segment"] = segment
    writer.open(info)
    for row in steps.to_dict("records"):
        writer.add_step({k: v for k, v in row.items() if not _missing(v)})
    if layers is not None and not layers.empty:
        writer.add_layers({c: (layers[c].tolist() if c == "name" else layers[c].to_numpy()) for c in layers.columns})
    for kind, step, detail in events:
        writer.add_event(kind, step, **detail)
    writer.close()
    assert writer.dropped_rows == 0
    return path


def _missing(value: Any) -> bool:
    return value is None  # NaN is data (a non-finite loss) and is written as such
