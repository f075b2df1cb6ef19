"""Head geometry of a layer, with one fallback order for every pass (kernel injection, tensor parallelism).

:func:`layer_geometry` is the one entry point. For each of ``num_heads`` / ``num_kv_heads`` / ``head_dim``:

1. the attention spec's size source (:data:`~policyinject.policy.model.SizeSource`: a literal, config
   attribute names, a ``config -> int`` or a ``(layer, config) -> int`` callable), read against the layer's
   config (:func:`config_for_layer`: the model config, or -- inside a vision-language wrapper whose config
   keeps the text model's geometry in ``text_config`` -- the layer's own sub-config);
2. else the layer's own modules: the attention module's ``num_heads`` / ``num_attention_heads`` / ``n_heads``
   / ``n_head``, ``num_key_value_heads`` / ``num_kv_heads`` / ``n_kv_heads`` and ``head_dim`` attributes,
   then any submodule's;
3. else (``derive=True``) shapes: ``head_dim`` from the config's hidden size (:data:`HIDDEN_SIZE`) or the
   q projection's rows, ``num_kv_heads`` from the k projection's rows (or the fused qkv's), ``num_heads``
   from the q rows when only ``head_dim`` is known.

So a plain ``nn.Module`` model without any config gets its geometry from literals, callables or its own
attributes.

Example:
    >>> from types import SimpleNamespace
    >>> config_heads(SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=64))
    HeadCounts(heads=8, kv_heads=2, head_dim=8)
    >>> config_heads(SimpleNamespace(n_head=4, n_embd=32))
    HeadCounts(heads=4, kv_heads=4, head_dim=8)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import attrs
from torch import nn

from .._nn import shape_out_in
from .model import AttentionSpec, QKVLayout, read_size

__all__ = ["HIDDEN_SIZE", "HeadCounts", "config_for_layer", "config_heads", "heads_from_attributes",
           "hidden_size", "layer_geometry"]

#: Attribute names of a module's head counts and head size, in order (first integer found wins).
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv")
HEAD_DIM_ATTRS = ("head_dim", "head_size")

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
    return _attribute(layer, None, HEAD_ATTRS), _attribute(layer, None, KV_HEAD_ATTRS)


def _attribute(layer: nn.Module, first: Optional[nn.Module], names: tuple) -> Optional[int]:
    """The first integer attribute among ``names`` on ``first`` (the attention module), then on any module of
    ``layer`` in module order."""
    mods = ([first] if first is not None else []) + [m for _, m in layer.named_modules()]
    for mod in mods:
        for name in names:
            v = getattr(mod, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def _attention_module(layer: nn.Module, attn: Optional[AttentionSpec]) -> Optional[nn.Module]:
    if attn is None or not attn.module:
        return layer if attn is not None else None
    try:
        return layer.get_submodule(attn.module)
    except AttributeError:
        return None


def config_for_layer(layer: Optional[nn.Module], attn: Optional[AttentionSpec], model_config: Any) -> Any:
    """The config a layer's geometry and value sources read.

    ``model_config`` itself (the model's, or the user's ``config`` override), unless it is a composite
    config -- it has a ``text_config`` (LLaVA, Mistral-3, Gemma-3, PaliGemma, Qwen2-VL) -- or is absent:
    then the layer's own config (its attention module's ``config``, else the layer's: the text sub-config for
    the language model's layers, the vision sub-config for a vision tower's), else the ``text_config``.

    Example:
        >>> from types import SimpleNamespace
        >>> text = SimpleNamespace(num_attention_heads=4)
        >>> layer = nn.Module(); layer.config = text
        >>> config_for_layer(layer, None, SimpleNamespace(text_config=text, vision_config=None)) is text
        True
        >>> plain = SimpleNamespace(num_attention_heads=8)
        >>> config_for_layer(layer, None, plain) is plain
        True
    """
    sub = model_config.get("text_config") if isinstance(model_config, Mapping) else \
        getattr(model_config, "text_config", None) if model_config is not None else None
    if model_config is not None and sub is None:
        return model_config
    if layer is not None:
        attn_module = _attention_module(layer, attn)
        for owner in (attn_module, layer):
            own = getattr(owner, "config", None) if owner is not None else None
            if own is not None and not callable(own):
                return own
    return sub


def _rows(layer: nn.Module, attn: AttentionSpec, name: Optional[str]) -> Optional[int]:
    if name is None:
        return None
    try:
        return int(shape_out_in(layer.get_submodule(attn.path(name)))[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def layer_geometry(layer: nn.Module, attn: Optional[AttentionSpec], model_config: Any,
                   derive: bool = True) -> HeadCounts:
    """Head counts of one layer (see the module docstring); None where nothing gives them.

    ``derive=False`` stops after the attributes (step 2): the tensor-parallel planner reads the rest from
    projection shapes itself.

    Example:
        >>> import torch
        >>> layer = nn.Module(); layer.attn = nn.Module(); layer.attn.num_heads = 4
        >>> layer.attn.q, layer.attn.k = nn.Linear(32, 32), nn.Linear(32, 16)
        >>> layer.attn.v, layer.attn.o = nn.Linear(32, 16), nn.Linear(32, 32)
        >>> spec = AttentionSpec(module="attn", q="q", k="k", v="v", o="o")
        >>> layer_geometry(layer, spec, None)
        HeadCounts(heads=4, kv_heads=2, head_dim=8)
        >>> layer_geometry(layer, attrs.evolve(spec, num_heads=lambda layer, config: 2), None).heads
        2
    """
    cfg = config_for_layer(layer, attn, model_config)
    sources = (attn.num_heads, attn.num_kv_heads, attn.head_dim) if attn is not None else (
        _DEFAULT.num_heads.default, _DEFAULT.num_kv_heads.default, _DEFAULT.head_dim.default)
    heads = read_size(cfg, sources[0], "num_heads", layer=layer)
    kv = read_size(cfg, sources[1], "num_kv_heads", layer=layer)
    hd = read_size(cfg, sources[2], "head_dim", layer=layer)
    first = _attention_module(layer, attn)
    heads = heads or _attribute(layer, first, HEAD_ATTRS)
    kv = kv or _attribute(layer, first, KV_HEAD_ATTRS)
    hd = hd or _attribute(layer, first, HEAD_DIM_ATTRS)
    if not derive or attn is None:
        if derive and heads:
            kv = kv or heads
            if hd is None:
                hidden = hidden_size(cfg)
                hd = hidden // heads if hidden and hidden % heads == 0 else None
        return HeadCounts(heads, kv, hd)
    q_rows = _rows(layer, attn, attn.q)
    if heads is None and hd and q_rows and q_rows % hd == 0:
        heads = q_rows // hd
    if heads and hd is None:
        hidden = hidden_size(cfg)
        if hidden and hidden % heads == 0:
            hd = hidden // heads
        elif q_rows and q_rows % heads == 0:
            hd = q_rows // heads
    if heads and hd and kv is None:
        if attn.qkv is not None:
            out = _rows(layer, attn, attn.qkv)
            if attn.qkv_layout is QKVLayout.BLOCKS and out and out % hd == 0 and (out // hd - heads) % 2 == 0:
                kv = (out // hd - heads) // 2 or None
        else:
            k_rows = _rows(layer, attn, attn.k)
            if k_rows and k_rows % hd == 0:
                kv = k_rows // hd
    if heads:
        kv = kv or heads
    return HeadCounts(heads, kv, hd)
