"""Tensor-parallel planning, attributes: the per-rank values of head counts and sizes a layer's forward reads.

Attribute names (the policy's ``tp_attributes`` plus known names such as ``num_heads``,
``num_key_value_groups``, ``split_size``) are matched by value on the attention module and its non-linear
descendants, and rewritten to this rank's value; paths under ``config.`` get a per-module config copy.

Example:
    >>> import torch
    >>> attn = torch.nn.Module(); attn.num_heads = 8; attn.q = torch.nn.Linear(4, 4)
    >>> [rw.attrs for rw in collect_rewrites(attn, "l0.attn", "", {}, DEFAULT_ATTENTION_ATTRIBUTES, {"heads": (8, 4)})]
    [(('num_heads', 4),)]
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from torch import nn

from ..errors import PlanError
from ..modules.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from ..plan import Action
from ..policy.model import Policy, is_linear_like
from ..tp_split import split_sizes
from .tp_heads import LayerHeads

__all__ = ["AttrRewrite", "DEFAULT_ATTENTION_ATTRIBUTES", "DEFAULT_MLP_ATTRIBUTES", "attribute_actions",
           "collect_rewrites", "apply_attributes"]

NAME = "tensor_parallel"

#: Attribute names rewritten per rank when their value equals the global quantity (matched by value, on the
#: attention module and its non-linear descendants). Paths under ``config.`` get a per-module config copy.
DEFAULT_ATTENTION_ATTRIBUTES: Mapping[str, str] = {
    "num_heads": "heads", "num_attention_heads": "heads", "n_head": "heads", "n_heads": "heads",
    "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads", "n_head_kv": "kv_heads",
    "num_key_value_groups": "kv_groups", "split_size": "hidden", "all_head_size": "hidden",
    "config.num_attention_heads": "heads", "config.num_key_value_heads": "kv_heads",
}
DEFAULT_MLP_ATTRIBUTES: Mapping[str, str] = {"intermediate_size": "intermediate", "intermediate_dim": "intermediate",
                                             "ffn_dim": "intermediate"}


@attrs.frozen
class AttrRewrite:
    """The action payload of ``rewrite_attributes``: attribute path -> this rank's value, on one module."""

    path: str  # module path
    attrs: Tuple[Tuple[str, Any], ...]


def attribute_actions(model: nn.Module, path: str, layer: nn.Module, policy: Policy, heads: Optional[LayerHeads],
                      inter: Optional[int], head_parents: Sequence[str], tp: int, grain: int, rank: int
                      ) -> List[Action]:
    """``rewrite_attributes`` actions of one layer: head counts, hidden sizes and the intermediate size."""
    rewrites: List[AttrRewrite] = []
    details: Dict[str, Any] = {}
    if heads is not None:
        s = heads.mine
        q = {"heads": (heads.heads, s.num_heads), "kv_heads": (heads.kv_heads, s.num_kv_heads),
             "hidden": (heads.heads * heads.head_dim, s.num_heads * heads.head_dim),
             "kv_hidden": (heads.kv_heads * heads.head_dim, s.num_kv_heads * heads.head_dim),
             "kv_groups": (heads.heads // heads.kv_heads, s.kv_groups)}
        attn = policy.attention
        if attn is not None:
            rewrites += collect_rewrites(layer, path, attn.module, dict(attn.tp_attributes),
                                          DEFAULT_ATTENTION_ATTRIBUTES, q)
        else:  # no attention role: the modules that own head-split linears
            for root in dict.fromkeys(head_parents):
                rewrites += collect_rewrites(layer, path, root, {}, DEFAULT_ATTENTION_ATTRIBUTES, q, deep=False)
    mlp = policy.mlp
    if inter is not None and mlp is not None:
        sizes = split_sizes(inter, tp, grain)
        q = {"intermediate": (inter, sizes[rank])}
        rewrites += collect_rewrites(layer, path, mlp.module, dict(mlp.tp_attributes), DEFAULT_MLP_ATTRIBUTES, q)
    out = []
    for rw in rewrites:
        details = {k: v for k, v in rw.attrs}
        mod = model.get_submodule(rw.path) if rw.path else model
        out.append(Action(NAME, rw.path, type(mod).__name__, "rewrite_attributes", details, rw))
    return out


def collect_rewrites(layer: nn.Module, path: str, root: str, explicit: Mapping[str, str],
                      defaults: Mapping[str, str], quantities: Mapping[str, Tuple[int, int]],
                      deep: bool = True) -> List[AttrRewrite]:
    try:
        base = layer.get_submodule(root) if root else layer
    except AttributeError:
        return []
    base_path = ".".join(p for p in (path, root) if p)
    per_module: Dict[str, Dict[str, Any]] = {}
    for attr, quantity in explicit.items():
        if quantity not in quantities:
            raise PlanError(f"{base_path}: tp_attributes[{attr!r}] names unknown quantity {quantity!r}; known: "
                            f"{', '.join(quantities)}")
        owner, _, name = attr.rpartition(".")
        mod_path, sub = _split_module_path(base, owner)
        key = ".".join(p for p in (base_path, mod_path) if p)
        per_module.setdefault(key, {})[".".join(p for p in (sub, name) if p)] = quantities[quantity][1]
    for rel, mod in (base.named_modules() if deep else [("", base)]):
        if is_linear_like(mod) or isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            continue
        key = ".".join(p for p in (base_path, rel) if p)
        for attr, quantity in defaults.items():
            if quantity not in quantities:
                continue
            glob, loc = quantities[quantity]
            value = _get_path(mod, attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == glob and glob != loc:
                per_module.setdefault(key, {}).setdefault(attr, loc)
    return [AttrRewrite(k, tuple(sorted(v.items()))) for k, v in per_module.items() if v]


def _split_module_path(base: nn.Module, owner: str) -> Tuple[str, str]:
    """Split ``owner`` into the longest submodule path and the remaining attribute path."""
    parts = owner.split(".") if owner else []
    for i in range(len(parts), -1, -1):
        try:
            base.get_submodule(".".join(parts[:i]))
            return ".".join(parts[:i]), ".".join(parts[i:])
        except AttributeError:
            continue
    return "", owner


def _get_path(obj: Any, attr: str) -> Any:
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def apply_attributes(model: nn.Module, rw: AttrRewrite) -> None:
    mod = model.get_submodule(rw.path) if rw.path else model
    copied: Dict[str, Any] = {}
    for attr, value in rw.attrs:
        parts = attr.split(".")
        obj = mod
        for i, part in enumerate(parts[:-1]):
            child = getattr(obj, part)
            if not isinstance(child, nn.Module):
                key = ".".join(parts[: i + 1])
                if key not in copied:  # a config object shared with other modules: copy it for this one only
                    copied[key] = copy.copy(child)
                    setattr(obj, part, copied[key])
                child = copied[key]
            obj = child
        setattr(obj, parts[-1], value)
