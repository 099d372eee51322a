"""Rows to Arrow tables for the run directory's Parquet parts: the documented column types, and
values that do not fit stored as nulls (one warning per column), never a lost part."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from spikedoc.store.schema import LAYER_COLUMNS

__all__ = ["TableBuilder"]

_F32, _F64, _I32, _I64 = pa.float32(), pa.float64(), pa.int32(), pa.int64()

#: Arrow types of the documented columns (docs/run-format.md); unknown columns are inferred.
_STEP_TYPES: dict[str, pa.DataType] = {
    "step": _I64, "segment": _I32, "time": _F64, "step_time": _F32, "loss": _F32,
    "micro_batches": _I32, "lr": _F32, "grad_norm": _F32, "clip_coef": _F32, "clip_max_norm": _F32, "param_norm": _F32,
    "update_norm": _F32, "full_stats": pa.bool_(), "nonfinite_grads": _I64, "loss_scale": _F32, "skipped": pa.bool_(),
    "samples": _I64, "tokens": _I64, "sample_offset": _I64, "sample_ids": pa.list_(pa.string()),
    "sample_losses": pa.list_(_F32), "batch_hash": pa.string(), "input_shapes": pa.string(),
    "seq_len_min": _F32, "seq_len_median": _F32, "seq_len_max": _F32, "distinct_token_ratio": _F32,
}  # fmt: skip
_LAYER_TYPES: dict[str, pa.DataType] = {
    **{c: _F32 for c in LAYER_COLUMNS}, "step": _I64, "segment": _I32, "name": pa.string(), "nonfinite": _I64,
}  # fmt: skip
_EVENT_TYPES: dict[str, pa.DataType] = {
    "step": _I64, "segment": _I32, "time": _F64, "kind": pa.string(), "detail": pa.string(),
}  # fmt: skip
_LR_GROUP = re.compile(r"lr_\d+")


class TableBuilder:
    """Builds the step, layer and event tables of one writer.

    Args:
        warn: `warn(key, reason)`: one warning per key (a value stored as null).
        drop: `drop(rows, key, reason)`: rows that could not be converted at all, counted as dropped.
    """

    def __init__(self, warn: Callable[[str, str], None], drop: Callable[[int, str, str], None]) -> None:
        self._warn = warn
        self._drop = drop
        # Sticky per writer so that every part of the run agrees; ints widen to float32 for good.
        self._extra_types: dict[str, pa.DataType] = {}

    def steps(self, rows: list[dict[str, Any]]) -> pa.Table:
        seen = dict.fromkeys(k for row in rows for k in row)
        keys = [k for k in _STEP_TYPES if k in seen] + [k for k in seen if k not in _STEP_TYPES]
        arrays = {}
        for key in keys:
            values = [_plain(row.get(key)) for row in rows]
            if key == "sample_ids":
                values = [None if v is None else [str(x) for x in v] for v in values]
            typ = _STEP_TYPES.get(key) or (_F32 if _LR_GROUP.fullmatch(key) else self._extra_type(key, values))
            arrays[key] = self._array(key, values, typ)
        return pa.table(arrays)

    def _extra_type(self, key: str, values: list[Any]) -> pa.DataType:
        seen = {type(v) for v in values if v is not None}
        old = self._extra_types.get(key)
        if seen and all(issubclass(t, (bool, np.bool_)) for t in seen):
            new = pa.bool_()
        elif seen and all(issubclass(t, (int, np.integer)) and not issubclass(t, bool) for t in seen):
            new = _I64
        elif seen and all(issubclass(t, (int, float, np.integer, np.floating)) for t in seen):
            new = _F32
        elif seen:
            new = pa.string()
        else:
            new = old or _F32  # all-null: typed, never Arrow's `null` type
        if old is not None and old != new and not (old == _I64 and new == _F32):
            new = old  # keep the column's type; _array turns values that do not fit into nulls
        self._extra_types[key] = new
        return new

    def _array(self, key: str, values: list[Any], typ: pa.DataType) -> pa.Array:
        try:
            return pa.array(values, type=typ)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        out = []
        for v in values:  # one bad value costs that cell, not the whole part
            try:
                out.append(pa.array([v if v is None or isinstance(v, (list, str)) else _scalar(v, typ)], type=typ)[0])
            except Exception:  # noqa: BLE001
                out.append(None)
                self._warn(f"value_{key}", f"column {key!r}: value {v!r} is not {typ}; stored as null")
        return pa.array([None if s is None else s.as_py() for s in out], type=typ)

    def layers(self, blocks: list[dict[str, Any]]) -> pa.Table | None:
        tables = []
        for block in blocks:
            try:  # a bad block costs its own rows, not the whole flush
                tables.append(
                    pa.table({k: pa.array(v, type=_LAYER_TYPES.get(k) or _numpy_type(v)) for k, v in block.items()})
                )
            except (pa.ArrowException, TypeError, ValueError) as exc:
                self._drop(len(block["name"]), "bad_layers", f"could not convert a layer block ({exc!r})")
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="default")
        return table.sort_by([("step", "ascending"), ("name", "ascending")])

    def events(self, rows: list[dict[str, Any]]) -> pa.Table:
        return pa.table({k: self._array(k, [r[k] for r in rows], t) for k, t in _EVENT_TYPES.items()})


def _numpy_type(values: np.ndarray) -> pa.DataType:
    kind = np.asarray(values).dtype.kind
    return {"b": pa.bool_(), "i": _I64, "u": _I64, "U": pa.string(), "O": pa.string()}.get(kind, _F32)


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d arrays/tensors as Python scalars, so their type is inferred right."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _scalar(value: Any, typ: pa.DataType) -> Any:
    if pa.types.is_floating(typ):
        return float(value)
    if pa.types.is_integer(typ):
        return int(value)
    if pa.types.is_boolean(typ):
        return bool(value)
    return str(value)
