"""Tensor-parallel planning, model level: the vocabulary-parallel embedding and output head.

The embedding is split by vocabulary rows (``tp_grain_size``, an all-reduce after the lookup); the output
head by vocabulary rows with the logits all-gathered; a head tied to the embedding shares its shard. Styles
come from the model policy (``embed``, ``lm_head``, ``styles``), else from the model's own Hugging Face plan
(AutoTP), and a Hugging Face model's input and output embeddings are found even without either.

Example:
    >>> import torch
    >>> from policyinject.passes.tp_linears import LinearSplitter
    >>> model = torch.nn.Module(); model.embed = torch.nn.Embedding(32, 8)
    >>> problems = []
    >>> embed, head = plan_model_level(model, None, None, LinearSplitter(tp=2, grain=8, rank=0), problems)
    >>> problems, [(a.path, a.details["local"]) for a in embed], [a.action for a in head]
    ([], [], ['lint'])
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs
from torch import nn

from .._nn import is_conv1d
from ..plan import Action
from ..policy.model import ModelPolicy, Style, is_linear_like
from ..tp_split import offsets, split_sizes
from .tp_heads import compact
from .tp_linears import LinearSplitter, ParamSlice, Shard

__all__ = ["plan_model_level"]

NAME = "tensor_parallel"


def _path_of(model: nn.Module, target: nn.Module) -> Optional[str]:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _model_styles(model: nn.Module, mp: Optional[ModelPolicy], autotp_mp: Optional[ModelPolicy]
                  ) -> Tuple[Dict[str, Style], str]:
    styles: Dict[str, Style] = {}
    how = "policy"
    if mp is not None:
        if mp.embed:
            styles[mp.embed] = Style.VOCAB_EMBEDDING
        if mp.lm_head:
            styles[mp.lm_head] = Style.VOCAB_HEAD
        styles.update(mp.styles)
        return styles, how
    if autotp_mp is not None:
        styles.update(autotp_mp.styles)
        how = "autotp:hf_plan"
    # the embedding and head of a Hugging Face model are found even without a plan entry for them
    for getter, style in (("get_input_embeddings", Style.VOCAB_EMBEDDING),
                          ("get_output_embeddings", Style.VOCAB_HEAD)):
        fn = getattr(model, getter, None)
        try:
            mod = fn() if callable(fn) else None
        except Exception:
            mod = None
        if mod is None or not (isinstance(mod, nn.Embedding) or is_linear_like(mod)):
            continue  # e.g. MusicGen's per-codebook lists: kept replicated
        p = _path_of(model, mod)
        if p is not None and not any(s is style for s in styles.values()) and p not in styles:
            styles[p] = style
            how = "autotp:structure" if how == "policy" else how
    return styles, how


def plan_model_level(model: nn.Module, model_policy: Optional[ModelPolicy], autotp_model_policy: Optional[ModelPolicy],
                     splitter: LinearSplitter, problems: List[str]) -> Tuple[List[Action], List[Action]]:
    """(embedding actions, output-head actions); problems are appended to ``problems``."""
    styles, how = _model_styles(model, model_policy, autotp_model_policy)
    embed_actions: List[Action] = []
    head_actions: List[Action] = []
    embed_paths: Dict[int, str] = {}
    embed_sizes: Dict[str, List[int]] = {}
    for p, style in styles.items():
        if style is not Style.VOCAB_EMBEDDING:
            continue
        mod = model.get_submodule(p)
        if not isinstance(mod, nn.Embedding):
            problems.append(f"{p}: vocab_embedding needs an nn.Embedding, found {type(mod).__name__}")
            continue
        V, D = mod.weight.shape
        sizes = split_sizes(int(V), splitter.tp, splitter.grain, where=f"{p} (vocabulary)")
        start = offsets(sizes)[splitter.rank]
        rows = tuple(range(start, start + sizes[splitter.rank]))
        details = {"style": style.value, "global": [int(V), int(D)], "local": [sizes[splitter.rank], int(D)],
                   "rows": compact(rows), "split": f"vocab, grain {splitter.grain}", "gather": "all-reduce"}
        if how != "policy":
            details["by"] = how
        shard = Shard("vocab_embedding", ParamSlice(f"{p}.weight", 0, rows), None, tuple(sizes), start,
                      (int(V), int(D)), padding_idx=mod.padding_idx)
        embed_actions.append(Action(NAME, p, type(mod).__name__, "vocab_embedding", details, shard))
        embed_paths[id(mod.weight)] = p
        embed_sizes[p] = sizes
    for p, style in styles.items():
        if style is Style.VOCAB_EMBEDDING:
            continue
        mod = model.get_submodule(p)
        if style is Style.REPLICATE:
            head_actions.append(Action(NAME, p, type(mod).__name__, "replicate", {"style": style.value}))
            continue
        if not is_linear_like(mod):
            problems.append(f"{p}: style {style.value} needs a linear, found {type(mod).__name__}")
            continue
        tie = embed_paths.get(id(mod.weight))
        a = splitter.linear_action(p, mod, style, None, None, None, is_conv1d(mod), how)
        if tie is not None and a.payload is not None and a.payload.kind == "vocab_head" \
                and list(a.payload.out_sizes) == embed_sizes[tie]:
            a = attrs.evolve(a, details={**a.details, "tied": tie}, payload=attrs.evolve(a.payload, tie_to=tie))
        head_actions.append(a)
    if not styles:
        head_actions.append(Action(NAME, "", type(model).__name__, "lint",
                                   {"message": "no embedding or output head found; they stay replicated"}))
    return embed_actions, head_actions
