"""Head geometry read from a model config, with one fallback order for every pass.

``num_heads`` / ``num_kv_heads`` / ``head_dim`` are read through the attention spec's size sources (or the
:class:`~policyinject.policy.model.AttentionSpec` defaults when a layer has no attention role); ``kv_heads``
falls back to ``heads``, ``head_dim`` to ``hidden_size // heads`` (hidden size read from
:data:`HIDDEN_SIZE`). A layer without a model config gives its head counts through module attributes
(:func:`heads_from_attributes`).

Example:
    >>> from types import SimpleNamespace
    >>> config_heads(SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=64))
    HeadCounts(heads=8, kv_heads=2, head_dim=8)
    >>> config_heads(SimpleNamespace(n_head=4, n_embd=32))
    HeadCounts(heads=4, kv_heads=4, head_dim=8)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import attrs
from torch import nn

from .model import AttentionSpec, read_size

__all__ = ["HIDDEN_SIZE", "HeadCounts", "config_heads", "heads_from_attributes", "hidden_size"]

#: Where a model config keeps its hidden size, in order.
HIDDEN_SIZE = ("hidden_size", "n_embd", "d_model", "dim")
_DEFAULT = AttentionSpec.__attrs_attrs__


@attrs.frozen
class HeadCounts:
    heads: Optional[int]
    kv_heads: Optional[int]
    head_dim: Optional[int]


def hidden_size(model_config: Any) -> Optional[int]:
    """The model's hidden size (:data:`HIDDEN_SIZE`), or None."""
    return read_size(model_config, HIDDEN_SIZE)


def config_heads(model_config: Any, attn: Optional[AttentionSpec] = None, derive: bool = True) -> HeadCounts:
    """Head counts from ``model_config`` (see the module docstring); None where the config says nothing.

    ``derive=False`` leaves ``kv_heads`` and ``head_dim`` None when the config does not give them (the
    tensor-parallel planner then derives them from projection shapes).
    """
    sources = (attn.num_heads, attn.num_kv_heads, attn.head_dim) if attn is not None else (
        _DEFAULT.num_heads.default, _DEFAULT.num_kv_heads.default, _DEFAULT.head_dim.default)
    heads = read_size(model_config, sources[0])
    kv = read_size(model_config, sources[1])
    hd = read_size(model_config, sources[2])
    if derive and heads:
        kv = kv or heads
        if hd is None:
            hidden = hidden_size(model_config)
            hd = hidden // heads if hidden and hidden % heads == 0 else None
    return HeadCounts(heads, kv, hd)


def heads_from_attributes(layer: nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """``(heads, kv_heads)`` from the first integer head-count attributes found in ``layer``'s modules.

    Example:
        >>> m = nn.Module(); m.num_heads = 4
        >>> heads_from_attributes(m)
        (4, None)
    """
    heads = kv = None
    for _, mod in layer.named_modules():
        for name in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
            v = getattr(mod, name, None)
            if isinstance(v, int) and heads is None:
                heads = v
        for name in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
            v = getattr(mod, name, None)
            if isinstance(v, int) and kv is None:
                kv = v
    return heads, kv
