"""Batch fingerprint: which samples a step saw and what they looked like, computed on the device.

For every training forward the monitor hands the call's inputs to `Fingerprint.observe`. Host-side
it notes sizes and shapes (free: no data is read); device-side it folds the input tensors into a
64-bit content hash and, for integer (token id) inputs, measures each sample's non-padding length
and distinct-token count. Nothing here copies the batch to the host or synchronises: the results are
small device tensors that ride along in the monitor's one device-to-host copy per step.
"""

from __future__ import annotations

import functools
import math
import sys
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Fingerprint", "batch_hash", "content_hash", "distinct_tokens", "sequence_stats", "flatten_inputs", "samples_in"]

_ROW = 4096  # hash weights per row; inputs are hashed as (rows, _ROW) blocks
_BLOCK = 1 << 22  # elements hashed per kernel batch, bounding the temporaries for large inputs
_SENTINEL = torch.iinfo(torch.int64).min  # marks padding before sorting; never a token id
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # odd 64-bit constant (golden ratio), as a signed int64
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_weights: dict[torch.device, Tensor] = {}
_COMBINED_MAX = 1 << 16  # elements of one forward's inputs hashed with cached per-element weights
_combined: dict[tuple[Any, ...], Tensor] = {}
_ones: dict[torch.device, Tensor] = {}


def _row_weights(device: torch.device) -> Tensor:
    w = _weights.get(device)
    if w is None:
        # Fixed seed: the same batch hashes the same in every run and on every device.
        gen = torch.Generator().manual_seed(0x5EED)
        w = torch.randint(-(1 << 62), 1 << 62, (_ROW,), generator=gen, dtype=torch.int64) * 2 + 1
        w = _weights[device] = w.to(device)
    return w


@functools.lru_cache(maxsize=256)
def _name_factor(name: str) -> int:
    return zlib.crc32(name.encode()) * 2 + 1  # odd: the product keeps every bit of the hash


def _bits(t: Tensor) -> Tensor:
    """The tensor's elements as int64 (floats by their bit pattern), flattened."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.int64:  # token ids: as they are (the usual input; `.to` would be a no-op call)
        return t
    if t.dtype == torch.bool:
        return t.to(torch.int64)
    if t.is_floating_point() or t.is_complex():
        t = t.view(_BITS[t.element_size()]) if t.element_size() in _BITS else t.view(torch.uint8)
    return t.to(torch.int64)


def content_hash(t: Tensor) -> Tensor:
    """64-bit polynomial hash of a tensor's contents and shape, as a 0-dim int64 device tensor.

    `sum_r (r * MIX + 1) * sum_j x[r, j] * w[j]` over rows of 4096 elements with fixed random odd
    weights `w`, computed modulo 2**64 (int64 arithmetic wraps), plus a hash of the shape and dtype.

    Example:
        >>> a = torch.arange(10)
        >>> bool(content_hash(a) == content_hash(a.clone())), bool(content_hash(a) == content_hash(a + 1))
        (True, False)
    """
    x = _bits(t)
    w = _row_weights(x.device)
    salt = zlib.crc32(f"{tuple(t.shape)}:{t.dtype}".encode())
    if x.numel() <= _ROW:
        # One row (r = 0, factor 1): the same sum without padding, row indices and the row factor.
        return (x * w[: x.numel()]).sum() + salt
    total = torch.full((), salt, dtype=torch.int64, device=x.device)
    for start in range(0, x.numel(), _BLOCK):
        block = x[start : start + _BLOCK]
        pad = (-block.numel()) % _ROW
        if pad:
            block = torch.cat([block, block.new_zeros(pad)])
        rows = block.view(-1, _ROW)  # (R, _ROW)
        row_hash = (rows * w).sum(1)  # (R,)
        r = torch.arange(start // _ROW, start // _ROW + rows.shape[0], device=x.device, dtype=torch.int64)
        total = total + (row_hash * (r * _MIX + 1)).sum()
    return total


def _inputs_hash(inputs: list[tuple[str, Tensor]]) -> Tensor | None:
    """`sum(content_hash(t) * name factor)` over one forward's inputs (the input order matters).

    Small inputs on one device (the usual batch of token ids) take a single weighted sum: every
    element's weight (row weight, row factor and name factor multiplied out, modulo 2**64) is cached
    per input signature, with the shape and dtype salts as the weight of one extra element 1, so the
    hash is one concatenation and one dot product.
    """
    if not inputs:
        return None
    device = inputs[0][1].device
    if sum(t.numel() for _, t in inputs) > _COMBINED_MAX or any(t.device != device for _, t in inputs):
        h = None
        for name, t in inputs:
            one = content_hash(t) * _name_factor(name)
            h = one if h is None else h + one
        return h
    key = (device, *((name, tuple(t.shape), t.dtype) for name, t in inputs))
    weights = _combined.get(key)
    if weights is None:
        parts, const = [], torch.zeros(1, dtype=torch.int64)
        for name, t in inputs:
            pos = torch.arange(t.numel(), dtype=torch.int64)
            w = _row_weights(torch.device("cpu"))[pos % _ROW] * ((pos // _ROW) * _MIX + 1)
            parts.append(w * _name_factor(name))
            const = const + torch.tensor(zlib.crc32(f"{tuple(t.shape)}:{t.dtype}".encode())) * _name_factor(name)
        if len(_combined) >= 16:
            _combined.clear()
        weights = _combined[key] = torch.cat([*parts, const]).to(device)
    x = torch.cat([*(_bits(t) for _, t in inputs), _one(device)])  # (elements + 1,)
    # Integer sums wrap modulo 2**64 in any order: the dot product equals the product's sum. CPU
    # has an int64 dot (one kernel); CUDA has none.
    return torch.dot(x, weights) if device.type == "cpu" else (x * weights).sum()


def _one(device: torch.device) -> Tensor:
    """A one-element int64 1 on `device` (made once): the element the salts' weight multiplies."""
    one = _ones.get(device)
    if one is None:
        one = _ones[device] = torch.ones(1, dtype=torch.int64, device=device)
    return one


def sequence_stats(ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-sample non-padding length and number of distinct tokens, on the device.

    Args:
        ids: Token ids, `(B, T)` (further dims are flattened into T).
        mask: True/nonzero for real tokens, same shape, or None when nothing is padding.

    Returns:
        `(lengths, distinct)`, both `(B,)` int64. Distinct tokens are counted by sorting each row and
        counting value changes: fixed shapes, no host sync.

    Example:
        >>> sequence_stats(torch.tensor([[5, 5, 7, 0]]), torch.tensor([[1, 1, 1, 0]]))
        (tensor([3]), tensor([2]))
    """
    ids = _rows_of(ids)  # (B, T)
    if mask is None:
        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=ids.device)
        return lengths, distinct_tokens(ids)
    mask = mask.detach().reshape(ids.shape) != 0
    lengths = mask.sum(1)
    s = torch.where(mask, ids, _SENTINEL).sort(dim=1).values  # (B, T)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    new &= s != _SENTINEL
    return lengths, new.sum(1)


def distinct_tokens(ids: Tensor) -> Tensor:
    """Per-sample number of distinct tokens of unpadded token ids `(B, T)`, `(B,)` int64 on the device."""
    ids = _rows_of(ids)
    if ids.shape[1] == 0:
        return torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    s = ids.sort(dim=1).values  # (B, T)
    return (s[:, 1:] != s[:, :-1]).sum(1) + 1  # the first token and every change


def _rows_of(ids: Tensor) -> Tensor:
    """Token ids as `(B, T)` int64 (further dims flattened into T); as they are when already so."""
    if ids.dim() != 2:
        ids = ids.reshape(ids.shape[0], -1)
    return ids if ids.dtype == torch.int64 else ids.to(torch.int64)


def flatten_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[tuple[str, Tensor]]:
    """(name, tensor) for every tensor in a forward call's inputs, one level into dicts and lists."""
    out: list[tuple[str, Tensor]] = []
    items = [(f"arg{i}", a, "") for i, a in enumerate(args)] + [(k, v, f"{k}.") for k, v in kwargs.items()]
    for name, value, prefix in items:
        if isinstance(value, Tensor):
            out.append((name, value))
        elif isinstance(value, Mapping):  # model(batch) with a dict batch: its keys name the inputs
            out += [(f"{prefix}{k}", v) for k, v in value.items() if isinstance(v, Tensor)]
        elif isinstance(value, (list, tuple)):
            out += [(f"{name}.{i}", v) for i, v in enumerate(value) if isinstance(v, Tensor)]
    return out


def _token_ids(inputs: list[tuple[str, Tensor]]) -> Tensor | None:
    """The token-id input: `input_ids`, else the first integer tensor with a batch dimension."""
    ids = dict(inputs).get("input_ids")
    if ids is None or ids.is_floating_point():
        ids = next((t for _, t in inputs if t.dim() >= 1 and not (t.is_floating_point() or t.is_complex())), None)
    return ids


def _samples(inputs: list[tuple[str, Tensor]], ids: Tensor | None) -> int:
    first = ids if ids is not None else next((t for _, t in inputs if t.dim() >= 1), None)
    return int(first.shape[0]) if first is not None else 0


def samples_in(batch: Any) -> int:
    """Samples in a batch, counted as the fingerprint counts a forward given it: the first dimension
    of its token ids, else of its first tensor (in a tuple, list or dict); 0 when it holds none."""
    inputs = flatten_inputs((batch,), {})
    return _samples(inputs, _token_ids(inputs))


def batch_hash(batch: Any) -> Tensor | None:
    """The content hash of every tensor in a batch (a tensor, or a tuple, list or dict of them), as
    the fingerprint hashes a forward given it: a 0-dim int64 device tensor, None when it holds none."""
    return _inputs_hash(flatten_inputs((batch,), {}))


@dataclass
class Fingerprint:
    """Accumulates the fingerprint of the micro-batches of one optimizer step.

    Args:
        pad_token_id: Token id that marks padding when no `attention_mask` input is given.
        measure: False to only count samples (steps that are not logged skip the device work).
    """

    pad_token_id: int | None = None
    measure: bool = True
    samples: int = 0
    tokens: int = 0
    shapes: str | None = None
    hash: Tensor | None = None
    lengths: list[Tensor | tuple[int, int]] = field(default_factory=list)
    """Per micro-batch: per-sample lengths `(B,)` on the device, or `(samples, length)` when nothing is padding."""
    distinct: list[Tensor] = field(default_factory=list)

    def observe(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Fold one forward call's inputs into the step's fingerprint."""
        work = self.note(args, kwargs)
        if work is not None:
            work()

    def note(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Callable[[], None] | None:
        """Count samples and tokens and note shapes now; return the device work (content hash,
        sequence statistics) for the caller to run, so that a failure in it is the caller's to report.
        None when there is nothing to measure.
        """
        inputs = flatten_inputs(args, kwargs)
        if not inputs:
            return None
        ids = _token_ids(inputs)
        self.samples += _samples(inputs, ids)
        self.tokens += ids.numel() if ids is not None else 0
        if self.shapes is None:
            self.shapes = ",".join(f"{n}:{'x'.join(map(str, t.shape)) or 'scalar'}" for n, t in inputs)
        if not self.measure:
            return None
        # Jagged/sparse/quantized inputs have no flat bit view; hash the rest.
        flat = [(n, t) for n, t in inputs if t.layout == torch.strided and not (t.is_nested or t.is_quantized)]
        ids = ids if ids is not None and ids.dim() >= 2 else None  # length statistics need (batch, seq)
        mask = dict(inputs).get("attention_mask")
        if ids is None or mask is None or mask.shape[:2] != ids.shape[:2]:
            mask = None

        def measure() -> None:
            h = _inputs_hash(flat)
            self.hash = h if self.hash is None else self.hash * _MIX + h  # micro-batch order matters
            if ids is not None:
                pad = mask if mask is not None else (ids != self.pad_token_id) if self.pad_token_id is not None else None
                if pad is None:  # every token counts: each sample's length is the row's, known here
                    self.lengths.append((ids.shape[0], ids.numel() // max(ids.shape[0], 1)))
                    self.distinct.append(distinct_tokens(ids))
                else:
                    lengths, distinct = sequence_stats(ids, pad)
                    self.lengths.append(lengths)
                    self.distinct.append(distinct)

        return measure

    def device_values(self) -> dict[str, Tensor]:
        """The step's device-side results: the hash as two 32-bit halves, per-sample distinct-token
        counts and, when some micro-batch had padding, lengths (empty if none). The statistics over
        samples are taken on the host (`host_values`)."""
        out: dict[str, Tensor] = {}
        if self.hash is not None:
            # Two 32-bit halves travel exactly through the float64 host transfer: a view, no kernel.
            halves = self.hash.reshape(1).view(torch.int32)
            out["hash_halves"] = halves if sys.byteorder == "little" else halves.flip(0)  # (lo, hi)
        if self.distinct:
            one = len(self.distinct) == 1  # one micro-batch: nothing to concatenate
            out["distinct"] = self.distinct[0] if one else torch.cat(self.distinct)  # (samples,)
            if self._host_lengths() is None:
                lengths = [n if isinstance(n, Tensor) else torch.full((n[0],), n[1], dtype=torch.int64, device=d.device)
                           for n, d in zip(self.lengths, self.distinct)]  # fmt: skip
                out["lengths"] = lengths[0] if one else torch.cat(lengths)
        return out

    def _host_lengths(self) -> list[int] | None:
        """Per-sample lengths when no micro-batch had padding (known on the host), else None."""
        if any(isinstance(n, Tensor) for n in self.lengths):
            return None
        return [length for samples, length in self.lengths for _ in range(samples)]

    def host_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Step-table columns from the host copies of `device_values()`."""
        row: dict[str, Any] = {}
        if "hash_halves" in values:
            lo, hi = (int(v) & 0xFFFFFFFF for v in values["hash_halves"])
            row["batch_hash"] = f"{(hi << 32) | lo:016x}"
        lengths = values["lengths"] if "lengths" in values else self._host_lengths() if "distinct" in values else None
        if lengths is not None and len(lengths):
            # Plain Python on the few samples of a step: right after a forward and backward the
            # first numpy calls run several times slower than these (cold caches, measured).
            lengths = [float(x) for x in lengths]
            ratios = [float(d) / n for d, n in zip(values["distinct"], lengths) if n > 0]
            s = sorted(lengths)
            n = len(s)
            row.update(seq_len_min=s[0], seq_len_median=(s[(n - 1) // 2] + s[n // 2]) / 2, seq_len_max=s[-1],
                       distinct_token_ratio=sum(ratios) / len(ratios) if ratios else math.nan)  # fmt: skip
        return row
