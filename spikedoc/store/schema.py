"""The run-directory format: layout, version and column names (documented in docs/run-format.md)."""

from __future__ import annotations

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "STEPS",
    "LAYERS",
    "EVENTS",
    "STEP_COLUMNS",
    "LAYER_COLUMNS",
    "EVENT_COLUMNS",
    "STEP_COLUMN_DOCS",
    "LAYER_COLUMN_DOCS",
    "EVENT_COLUMN_DOCS",
    "columns",
    "lr_column",
    "partition_dir",
]

#: Bumped whenever a reader of the previous version could misread a run.
FORMAT_VERSION = 1

META_FILE = "meta.json"
STEPS = "steps"
LAYERS = "layers"
EVENTS = "events"

#: Step table: one row per logged optimizer step. Further columns may appear: `lr_<i>` for param
#: group i > 0, and any extra scalar passed to `Monitor.record(**extra)`.
STEP_COLUMN_DOCS = {
    "step": "int64, index of the optimizer step (0-based, continues across resumes)",
    "segment": "int32, 0 for the first watch() of the run dir, +1 for each resume appended to it",
    "time": "float64, unix seconds at the end of the step",
    "step_time": "float32, seconds since the previous step ended (NaN for the first)",
    "loss": "float32, mean over micro-batches (NaN when never seen)",
    "micro_batches": "int32, forward/backward passes accumulated into this step",
    "lr": "float32, learning rate of param group 0",
    "grad_norm": "float32, total L2 norm of all gradients before clipping",
    "clip_coef": "float32, factor applied by clip= or the loop's own clip_grad_norm_ (1.0 when no clipping happened)",
    "clip_max_norm": "float32, max norm of the loop's own clip_grad_norm_ (absent when the loop does not clip)",
    "param_norm": "float32, total L2 norm of the parameters after the step (null when full_stats is false)",
    "update_norm": "float32, total L2 norm of the parameter change of this step (null when full_stats is false)",
    "full_stats": "bool, the step holds the full statistics (update norms; layer rows with grad_max and optimizer state); false only under watch(budget=)",
    "nonfinite_grads": "int64, count of NaN/inf gradient elements",
    "loss_scale": "float32, GradScaler scale used for this step (null without scaler)",
    "skipped": "bool, the optimizer step was skipped (inf grads under a GradScaler)",
    "samples": "int64, samples in the step (sum over micro-batches)",
    "tokens": "int64, elements of integer inputs in the step (0 when none)",
    "sample_offset": "int64, samples seen before this step: positions are [offset, offset+samples)",
    "sample_ids": "list<string>, ids given to record(sample_ids=...), else null",
    "sample_losses": "list<float32>, aligned with sample_ids, else null",
    "batch_hash": "string, hex content hash of the step's input tensors",
    "input_shapes": "string, e.g. 'input_ids:8x128,labels:8x128' (first micro-batch)",
    "seq_len_min": "float32, non-padding length per sample of integer inputs: min over the batch",
    "seq_len_median": "float32, non-padding length per sample of integer inputs: median over the batch",
    "seq_len_max": "float32, non-padding length per sample of integer inputs: max over the batch",
    "distinct_token_ratio": "float32, mean over samples of distinct tokens / non-padding length",
}
STEP_COLUMNS = tuple(STEP_COLUMN_DOCS)

#: Layer table: long format, one row per (logged step, parameter tensor).
LAYER_COLUMN_DOCS = {
    "step": "int64, index of the optimizer step",
    "segment": "int32, as in the step table",
    "name": "string (dictionary-encoded), from model.named_parameters()",
    "grad_norm": "float32, L2 norm of the gradient (before clipping)",
    "grad_max": "float32, max |grad|",
    "param_norm": "float32, L2 norm after the step (null on steps without full_stats)",
    "update_norm": "float32, L2 norm of this step's change",
    "update_ratio": "float32, update_norm / param_norm before the step",
    "nonfinite": "int64, NaN/inf gradient elements",
    "exp_avg_norm": "float32, Adam/AdamW: L2 norm of exp_avg (null otherwise)",
    "exp_avg_sq_mean": "float32, Adam/AdamW: mean of exp_avg_sq",
    "exp_avg_sq_max": "float32, Adam/AdamW: max of exp_avg_sq",
    "eps_frac": "float32, Adam/AdamW: share of elements with sqrt(v_hat) <= eps",
    "momentum_norm": "float32, SGD with momentum, Muon: L2 norm of momentum_buffer; Lion: of exp_avg",
    # Lion: "sign_flip_frac"; Adafactor: "row_var_mean", "col_var_mean", "var_mean", "var_max";
    # Schedule-Free: "z_norm"; any other optimizer: "state_norm_<key>" per floating state tensor key
}
LAYER_COLUMNS = tuple(LAYER_COLUMN_DOCS)

#: Event table: things that happened, as opposed to per-step measurements.
EVENT_COLUMN_DOCS = {
    "step": "int64, optimizer step at which it happened",
    "segment": "int32, as in the step table",
    "time": "float64, unix seconds",
    "kind": "string: start, close, checkpoint, logging_error, ...",
    "detail": "string, JSON object with kind-specific fields",
}
EVENT_COLUMNS = tuple(EVENT_COLUMN_DOCS)


def columns(table: str = STEPS) -> dict[str, str]:
    """The documented columns of one table of the run format: name -> type and meaning.

    Args:
        table: `"steps"`, `"layers"` or `"events"`.

    Example:
        >>> columns()["grad_norm"]
        'float32, total L2 norm of all gradients before clipping'
        >>> columns("layers")["eps_frac"]
        'float32, Adam/AdamW: share of elements with sqrt(v_hat) <= eps'
    """
    docs = {STEPS: STEP_COLUMN_DOCS, LAYERS: LAYER_COLUMN_DOCS, EVENTS: EVENT_COLUMN_DOCS}
    if table not in docs:
        raise ValueError(f"unknown table {table!r}: choose one of {', '.join(map(repr, docs))}")
    return dict(docs[table])


def lr_column(group: int) -> str:
    """Column name of param group `group`'s learning rate: `lr` for group 0, else `lr_<group>`."""
    return "lr" if group == 0 else f"lr_{group}"


def partition_dir(table: str, rank: int) -> str:
    """Relative folder of one rank's part files of a table, hive style: `steps/rank=0`."""
    return f"{table}/rank={rank}"
