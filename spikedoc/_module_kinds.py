"""Module kinds of parameters (embeddings, attention, mlp, norms, head, other) from names and module types.

Pure Python, so both the analysis and the in-training side (the live TensorBoard mirror) can use it
without pandas or torch.
"""

from __future__ import annotations

import re

__all__ = ["MODULE_KINDS", "module_kind", "module_kinds"]

#: Module groups, in display order.
MODULE_KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")

# Name fragments per module kind, checked in this order (attention before mlp: "attn.c_proj").
_NAME_RULES = (
    ("norms", re.compile(r"(^|[._])(ln|ln_f|ln_\d+|norm\w*|\w*norm|layernorm|rmsnorm|bn\d*)([._]|$)", re.I)),
    ("embeddings", re.compile(r"(embed|wte|wpe|tok_emb|pos_emb|position_emb|word_emb)", re.I)),
    ("head", re.compile(r"(^|[._])(lm_head|head|classifier|output|score)([._]|$)", re.I)),
    ("attention", re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value)", re.I)),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|feedforward|c_fc|fc\d*|up_proj|down_proj|gate_proj|w[123]|intermediate|linear[12])", re.I)),
)


def module_kinds(names: list[str], module_types: dict[str, str | None]) -> dict[str, str]:
    """`module_kind` of each name, completed from registration order when the name says nothing.

    `module_types` (from meta.json) lists the parameters in `named_parameters` order, which follows
    the order a block builds its layers in. A tensor that neither its type nor its name places
    takes the attention or MLP kind of the tensor registered just before it in the same block:
    `blocks.0.proj` after `blocks.0.qkv` is attention's output projection, `blocks.0.out` after
    `blocks.0.fc` the MLP's. Without meta.json the order is unknown and nothing is inferred.

    Example:
        >>> order = {"b.0.qkv.weight": "Linear", "b.0.proj.weight": "Linear", "b.0.fc.weight": "Linear",
        ...          "b.0.out.weight": "Linear"}
        >>> module_kinds(["b.0.out.weight", "b.0.proj.weight"], order)
        {'b.0.out.weight': 'mlp', 'b.0.proj.weight': 'attention'}
    """
    kinds: dict[str, str] = {}
    previous: tuple[str, str] | None = None  # (block, kind) of the last tensor in registration order
    for name in [*module_types, *(n for n in names if n not in module_types)]:
        kind = module_kind(name, module_types.get(name))
        block = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        if kind == "other" and name in module_types and previous and previous[0] == block and previous[1] in ("attention", "mlp"):
            kind = previous[1]
        kinds[name] = kind
        previous = (block, kind)
    return {name: kinds[name] for name in names}


def module_kind(name: str, module_type: str | None = None) -> str:
    """Module group of a parameter from its module type (when known) and its name.

    Example:
        >>> module_kind("transformer.h.0.attn.c_attn.weight")
        'attention'
        >>> module_kind("blocks.1.ln_1.weight", "LayerNorm")
        'norms'
    """
    kind = (module_type or "").lower()
    if "embedding" in kind:
        return "embeddings"
    if "norm" in kind:
        return "norms"
    if "attention" in kind:
        return "attention"
    for group, pattern in _NAME_RULES:
        if pattern.search(name):
            return group
    return "other"
