"""Tensor-parallel apply: build each parallel module from this rank's slices.

Slices come from a source (the in-memory module, or a checkpoint read by :mod:`policyinject.checkpoint`);
each :class:`~policyinject.passes.tp_linears.Shard` becomes a ``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding`` or ``VocabParallelHead``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..distributed import TPInfo
from ..modules.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       VocabParallelHead, _new_linear)
from .tp_linears import ParamSlice, Shard

__all__ = ["build_parallel", "shard_tensors"]


def build_parallel(model: nn.Module, path: str, shard: Shard, source: Any, info: TPInfo,
                   built: Mapping[str, nn.Module]) -> nn.Module:
    """The parallel module replacing the linear or embedding at ``path``, from this rank's slices."""
    old = model.get_submodule(path)
    ref = old.weight
    dtype = ref.dtype
    device = source.device_for(ref)
    common = dict(group=info.group, rank=info.rank, world_size=info.world_size)

    def fetch(ps: Optional[ParamSlice], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if ps is None:
            return None
        t = source.get(ps, like)
        return t.to(device=device, dtype=like.dtype if like is not None else dtype)

    if shard.kind == "vocab_embedding":
        w = fetch(shard.weight, ref)
        V = shard.global_shape[0]
        emb = VocabParallelEmbedding(w, shard.in_start, V, padding_idx=shard.padding_idx, **common)
        scale = getattr(old, "embed_scale", None)  # Gemma's scaled embedding
        if scale is not None:
            emb.embed_scale = scale.detach().clone() if isinstance(scale, torch.Tensor) else float(scale)
        return emb
    bias_like = getattr(old, "bias", None)
    if shard.kind in ("column", "column_gather", "vocab_head"):
        if shard.tie_to is not None:
            w = built[shard.tie_to].weight
        else:
            w = fetch(shard.weight, ref)
        b = fetch(shard.bias, bias_like)
        local = _new_linear(w, b)
        cls = VocabParallelHead if shard.kind == "vocab_head" else ColumnParallelLinear
        kw = dict(out_sizes=shard.out_sizes, global_in_features=shard.global_shape[1],
                  global_out_features=shard.global_shape[0], **common)
        if shard.kind == "column_gather":
            kw["gather_output"] = True
        return cls(local, **kw)
    w = fetch(shard.weight, ref)
    b = fetch(shard.bias, bias_like)
    return RowParallelLinear(_new_linear(w, None), b, split_input=shard.kind == "row_split_input",
                             in_start=shard.in_start, global_in_features=shard.global_shape[1], **common)


def shard_tensors(shard: Shard, new: nn.Module) -> Dict[str, torch.Tensor]:
    """Original tensor name -> this rank's local tensor (what ``save_mp_checkpoint_path`` writes)."""
    out: Dict[str, torch.Tensor] = {}
    if shard.tie_to is None:
        out[shard.weight.name] = new.weight
    if shard.bias is not None and getattr(new, "bias", None) is not None:
        out[shard.bias.name] = new.bias
    return out
