"""Tensor-parallel planning, attention heads: each layer's head geometry and this rank's share of it.

Head counts come from the layer's geometry (:func:`policyinject.policy.geometry.layer_geometry`: the policy's
size sources read against the layer's config -- the text sub-config inside a vision-language wrapper --, else
the layer's own attributes), corrected by the
projection shapes (Falcon multi-query keeps ``num_kv_heads = num_heads`` in its config), and are split by
:func:`policyinject.tp_split.split_heads`: whole KV groups per rank, or KV heads replicated when ``tp_size``
exceeds them.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from policyinject.policy import AttentionSpec
    >>> layer = torch.nn.Module()
    >>> layer.q, layer.k, layer.v, layer.o = (torch.nn.Linear(32, n) for n in (32, 16, 16, 32))
    >>> spec = AttentionSpec(q="q", k="k", v="v", o="o")
    >>> heads = layer_heads("l0", layer, spec, SimpleNamespace(num_attention_heads=4, hidden_size=32), tp=2, rank=1)
    >>> heads.heads, heads.kv_heads, heads.head_dim, heads.mine.num_heads, head_text(heads)
    (4, 2, 8, 2, 'q 2:4 of 4, kv 1:2 of 2')
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn

from .._nn import shape_out_in
from ..errors import PlanError
from ..policy import qkv_rows
from ..policy.geometry import config_for_layer, hidden_size, layer_geometry
from ..policy.model import AttentionSpec, QKVLayout
from ..tp_split import HeadShard, head_rows, runs, split_heads

__all__ = ["LayerHeads", "layer_heads", "compact", "head_text", "fused_qkv_rows", "head_split"]


def compact(index: Sequence[int]) -> str:
    """Index runs as ``start:end`` ranges (``-`` for none)."""
    return ",".join(f"{s}:{s + n}" for s, n in runs(index)) if len(index) else "-"


@attrs.define
class LayerHeads:
    """Head geometry of one layer and this rank's shard of it."""

    heads: int
    kv_heads: int
    head_dim: int
    shards: List[HeadShard]
    rank: int

    @property
    def mine(self) -> HeadShard:
        return self.shards[self.rank]


def layer_heads(path: str, layer: nn.Module, attn: Optional[AttentionSpec], model_config: object, tp: int,
                rank: int) -> Optional[LayerHeads]:
    """The head geometry of ``layer`` split over ``tp`` ranks (None when the layer has no head counts)."""
    counts = layer_geometry(layer, attn, model_config, derive=False)
    heads, kv, hd = counts.heads, counts.kv_heads, counts.head_dim
    if heads is None:
        return None
    hidden = hidden_size(config_for_layer(layer, attn, model_config))
    # shapes win over the config (Falcon multi-query keeps num_kv_heads = num_heads in its config)
    if attn is not None:
        if attn.q is not None:
            q_out = shape_out_in(layer.get_submodule(attn.path(attn.q)))[0]
            hd = hd or q_out // heads
            k_out = shape_out_in(layer.get_submodule(attn.path(attn.k)))[0]
            kv = k_out // hd
        elif attn.qkv is not None:
            out = shape_out_in(layer.get_submodule(attn.path(attn.qkv)))[0]
            hd = hd or (hidden // heads if hidden else None)
            if hd is None:
                raise PlanError(f"{path}: cannot tell head_dim of the fused {attn.qkv}")
            if attn.qkv_layout is QKVLayout.PER_HEAD:
                kv = heads
            elif attn.qkv_layout is QKVLayout.BLOCKS:
                kv = (out // hd - heads) // 2
            if (heads + 2 * (kv or heads)) * hd != out:
                raise PlanError(f"{path}.{attn.path(attn.qkv)}: {out} output features do not match {heads} query "
                                f"heads, {kv} kv heads of size {hd} in the {attn.qkv_layout.value} layout")
    kv = kv or heads
    if hd is None:
        if not hidden:
            return None
        hd = hidden // heads
    shards = split_heads(heads, kv, tp, where=f"{path} ({type(layer).__name__})")
    return LayerHeads(heads, kv, hd, shards, rank)


def head_text(heads: LayerHeads) -> str:
    s = heads.mine
    return f"q {compact(s.q_heads)} of {heads.heads}, kv {compact(s.kv_heads)} of {heads.kv_heads}"


def head_split(heads: LayerHeads, which: str, total: int) -> Tuple[List[int], str, List[int]]:
    """(this rank's rows, a description, every rank's size) of a split by q (``which="q"``) or kv heads."""
    d = heads.head_dim
    mine = heads.mine.q_heads if which == "q" else heads.mine.kv_heads
    sizes = [(len(s.q_heads) if which == "q" else len(s.kv_heads)) * d for s in heads.shards]
    rep = f", replicated x{heads.mine.kv_replicas}" if which == "kv" and heads.mine.kv_replicas > 1 else ""
    return head_rows(mine, d), f"{which} heads {compact(mine)} of {total}{rep}", sizes


def fused_qkv_rows(layout: QKVLayout, heads: LayerHeads) -> List[int]:
    """Global rows of this rank's q, k and v heads, ordered in the same layout with the local head counts."""
    s, d = heads.mine, heads.head_dim
    gq, gk, gv = qkv_rows(layout, heads.heads, heads.kv_heads, d)
    lq, lk, lv = qkv_rows(layout, s.num_heads, s.num_kv_heads, d)
    rows = torch.empty(len(lq) + len(lk) + len(lv), dtype=torch.long)
    rows[lq] = gq.view(heads.heads, d)[s.q_heads].flatten()
    rows[lk] = gk.view(heads.kv_heads, d)[s.kv_heads].flatten()
    rows[lv] = gv.view(heads.kv_heads, d)[s.kv_heads].flatten()
    return rows.tolist()
