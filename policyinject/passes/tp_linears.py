"""Tensor-parallel planning, linears: which rows or columns of each linear this rank keeps.

Column-parallel linears split their output features (by attention heads for q/k/v and fused QKV, by
``tp_grain_size`` for MLP and vocabulary dimensions, both halves of a packed gate|up alike); row-parallel
linears split their input features the same way. Each split linear is one :class:`~policyinject.plan.Action`
whose payload is a :class:`Shard` (what apply needs to build the parallel module).

Example:
    >>> import torch
    >>> from policyinject.policy import Policy
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc1 = torch.nn.Linear(8, 24); self.fc2 = torch.nn.Linear(24, 8)
    >>> block = Block()
    >>> actions, _ = LinearSplitter(tp=2, grain=8, rank=1).plan_layer(
    ...     block, None, "", block, Policy(Block, styles={"fc2": "row"}, default_style="column"), "policy")
    >>> [(a.path, a.action, a.details["local"], a.details.get("rows") or a.details.get("cols")) for a in actions]
    [('fc1', 'column', [8, 8], '16:24'), ('fc2', 'row', [8, 8], '16:24')]
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attrs
from torch import nn

from .._nn import is_conv1d, shape_out_in
from ..errors import PlanError
from ..plan import Action
from ..policy.model import AttentionSpec, Policy, Style, is_linear_like
from ..tp_split import offsets, split_sizes
from .tp_attributes import attribute_actions
from .tp_heads import LayerHeads, compact, fused_qkv_rows, head_split, head_text, layer_heads

__all__ = ["ParamSlice", "Shard", "LinearSplitter"]

NAME = "tensor_parallel"


@attrs.frozen
class ParamSlice:
    """Which part of one original tensor a rank keeps: ``index`` along ``dim`` (None: the whole tensor)."""

    name: str
    dim: int = 0
    index: Optional[Tuple[int, ...]] = None
    #: The original is stored ``[in, out]`` (GPT-2 ``Conv1D``): ``dim`` refers to the ``[out, in]`` view.
    transposed: bool = False


@attrs.frozen
class Shard:
    """Everything apply needs to build one parallel module (the action's payload)."""

    kind: str  # column | column_gather | vocab_head | row | row_split_input | vocab_embedding
    weight: ParamSlice
    bias: Optional[ParamSlice] = None
    out_sizes: Tuple[int, ...] = ()
    in_start: int = 0
    global_shape: Tuple[int, ...] = ()
    padding_idx: Optional[int] = None
    #: For a tied head: the model path of the vocabulary-parallel embedding whose shard it shares.
    tie_to: Optional[str] = None


@attrs.frozen
class LinearSplitter:
    """Plans the splits of one rank (``rank`` of ``tp``; ``grain``: ``tp_grain_size``)."""

    tp: int
    grain: int
    rank: int

    def plan_layer(self, model: nn.Module, model_config: Any, path: str, layer: nn.Module, policy: Policy, how: str
                   ) -> Tuple[List[Action], Optional[LayerHeads]]:
        """The actions of one layer (every linear, attribute rewrites, lint), and its head geometry."""
        styles, unmatched, uncovered = policy.styles_for(layer)
        if policy.default_style is Style.COLUMN:  # DeepSpeed: any linear containing down_proj is row-parallel
            for name in styles:
                if "down_proj" in name and name not in policy.styles:
                    styles[name] = Style.ROW
        attn, mlp = policy.attention, policy.mlp
        heads = layer_heads(path, layer, attn, model_config, self.tp, self.rank)
        role: Dict[str, str] = {}
        if attn is not None:
            if attn.qkv is not None:
                role[attn.path(attn.qkv)] = "qkv"
            else:
                role.update({attn.path(attn.q): "q", attn.path(attn.k): "k", attn.path(attn.v): "v"})
            if attn.o is not None:
                role[attn.path(attn.o)] = "o"
        inter: Optional[int] = None
        if mlp is not None:
            if mlp.gated:
                if mlp.gate_up is not None:
                    role[mlp.path(mlp.gate_up)] = "gate_up"
                else:
                    role[mlp.path(mlp.gate)] = "up"
                    role[mlp.path(mlp.up)] = "up"
                role[mlp.path(mlp.down)] = "down"
            else:
                role[mlp.path(mlp.fc1)] = "up"
                role[mlp.path(mlp.fc2)] = "down"
        actions: List[Action] = []
        transposed = set(policy.transposed)
        head_parents: List[str] = []
        order = {name: i for i, (name, _) in enumerate(layer.named_modules())}
        for rel, style in sorted(styles.items(), key=lambda kv: order.get(kv[0], 0)):  # in module order
            mod = layer.get_submodule(rel)
            full = f"{path}.{rel}" if path else rel
            if not is_linear_like(mod):
                if style is not Style.REPLICATE:
                    raise PlanError(f"{full} ({type(mod).__name__}): style {style.value!r} needs a linear")
                actions.append(Action(NAME, full, type(mod).__name__, "replicate", {"style": style.value}))
                continue
            t = rel in transposed or is_conv1d(mod)
            out_f, in_f = shape_out_in(mod)
            r = role.get(rel)
            if r in ("up", "down") and style in (Style.COLUMN, Style.ROW):
                inter = in_f if r == "down" else out_f
            a = self.linear_action(full, mod, style, r, heads, attn, t, how)
            if "heads" in str(a.details.get("split", "")):
                head_parents.append(rel.rpartition(".")[0])
            actions.append(a)
        actions += attribute_actions(model, path, layer, policy, heads, inter, head_parents, self.tp, self.grain,
                                     self.rank)
        for rule in unmatched:
            actions.append(Action(NAME, path, type(layer).__name__, "lint",
                                  {"rule": rule, "problem": "matches no submodule", "source": policy.source or how}))
        for name in uncovered:
            actions.append(Action(NAME, f"{path}.{name}", type(layer.get_submodule(name)).__name__, "replicate",
                                  {"reason": "no rule covers this linear; kept whole on every rank"}))
        return actions, heads

    def linear_action(self, full: str, mod: nn.Module, style: Style, role: Optional[str], heads: Optional[LayerHeads],
                       attn: Optional[AttentionSpec], transposed: bool, how: str) -> Action:
        out_f, in_f = shape_out_in(mod)
        cls = type(mod).__name__
        details: Dict[str, Any] = {"style": style.value, "global": [out_f, in_f]}
        if how != "policy":
            details["by"] = how
        has_bias = getattr(mod, "bias", None) is not None
        w = f"{full}.weight"
        b = f"{full}.bias" if has_bias else None
        if style is Style.REPLICATE:
            return Action(NAME, full, cls, "replicate", details)
        if style in (Style.COLUMN, Style.PACKED_COLUMN):
            rows, split, sizes = self._column_rows(full, out_f, style, role, heads, attn)
            details.update(local=[len(rows), in_f], rows=compact(rows), split=split)
            shard = Shard("column", ParamSlice(w, 0, tuple(rows), transposed),
                          ParamSlice(b, 0, tuple(rows)) if b else None, tuple(sizes), 0, (out_f, in_f))
            return Action(NAME, full, cls, "column", details, shard)
        if style in (Style.COLUMN_GATHER, Style.VOCAB_HEAD):
            sizes = split_sizes(out_f, self.tp, self.grain, where=f"{full} (output features)")
            start = offsets(sizes)[self.rank]
            rows = list(range(start, start + sizes[self.rank]))
            details.update(local=[len(rows), in_f], rows=compact(rows), split=f"grain {self.grain}, gathered")
            kind = "vocab_head" if style is Style.VOCAB_HEAD else "column_gather"
            shard = Shard(kind, ParamSlice(w, 0, tuple(rows), transposed), ParamSlice(b, 0, tuple(rows)) if b else None,
                          tuple(sizes), 0, (out_f, in_f))
            return Action(NAME, full, cls, kind, details, shard)
        if style in (Style.ROW, Style.ROW_SPLIT_INPUT):
            if style is Style.ROW_SPLIT_INPUT:
                sizes = split_sizes(in_f, self.tp, self.grain, where=f"{full} (input features)")
                start = offsets(sizes)[self.rank]
                cols, split = list(range(start, start + sizes[self.rank])), f"grain {self.grain}, input sliced"
            else:
                cols, split = self._row_cols(full, in_f, role, heads)
                start = 0
            details.update(local=[out_f, len(cols)], cols=compact(cols), split=split,
                           bias="added once after all-reduce" if b else "none")
            kind = "row_split_input" if style is Style.ROW_SPLIT_INPUT else "row"
            shard = Shard(kind, ParamSlice(w, 1, tuple(cols), transposed), ParamSlice(b) if b else None, (), start,
                          (out_f, in_f))
            return Action(NAME, full, cls, kind, details, shard)
        raise PlanError(f"{full}: style {style.value!r} is not valid for a linear inside a layer")

    def _column_rows(self, full: str, out_f: int, style: Style, role: Optional[str], heads: Optional[LayerHeads],
                     attn: Optional[AttentionSpec]) -> Tuple[List[int], str, List[int]]:
        if role in ("q", "k", "v", "qkv") and heads is None:
            raise PlanError(f"{full}: attention head counts are unknown (no model config); give the policy's "
                            f"AttentionSpec.num_heads")
        if role == "q":
            return head_split(heads, "q", heads.heads)
        if role in ("k", "v"):
            return head_split(heads, "kv", heads.kv_heads)
        if role == "qkv":
            rows = fused_qkv_rows(attn.qkv_layout, heads)
            sizes = [(s.num_heads + 2 * s.num_kv_heads) * heads.head_dim for s in heads.shards]
            return rows, f"{attn.qkv_layout.value} q/k/v heads ({head_text(heads)})", sizes
        if role == "gate_up" or style is Style.PACKED_COLUMN:
            if out_f % 2:
                raise PlanError(f"{full}: packed gate|up projection has an odd number ({out_f}) of output features")
            half = out_f // 2
            sizes = split_sizes(half, self.tp, self.grain, where=f"{full} (packed halves of {half})")
            start = offsets(sizes)[self.rank]
            mine = list(range(start, start + sizes[self.rank]))
            return mine + [half + i for i in mine], f"packed 2 x grain {self.grain}", [2 * s for s in sizes]
        return self._generic(full, out_f, heads, column=True)

    def _row_cols(self, full: str, in_f: int, role: Optional[str], heads: Optional[LayerHeads]) -> Tuple[List[int], str]:
        if role == "o":
            if heads is None:
                raise PlanError(f"{full}: attention head counts are unknown (no model config)")
            rows, split, _ = head_split(heads, "q", heads.heads)
            if len(heads.shards) and in_f != heads.heads * heads.head_dim:
                raise PlanError(f"{full}: {in_f} input features do not match {heads.heads} heads of size {heads.head_dim}")
            return rows, split
        rows, split, _ = self._generic(full, in_f, heads, column=False)
        return rows, split

    def _generic(self, full: str, dim: int, heads: Optional[LayerHeads], column: bool) -> Tuple[List[int], str, List[int]]:
        """A linear without a role: split by heads when its size is a head multiple, else by grain."""
        if heads is not None:
            d = heads.head_dim
            if dim == heads.heads * d:
                return head_split(heads, "q", heads.heads)
            if column and dim == heads.kv_heads * d:
                return head_split(heads, "kv", heads.kv_heads)
            if column and heads.heads == heads.kv_heads and dim == 3 * heads.heads * d:
                rows = [h * 3 * d + i for h in heads.mine.q_heads for i in range(3 * d)]
                sizes = [3 * d * s.num_heads for s in heads.shards]
                return rows, f"per-head fused q/k/v heads {compact(heads.mine.q_heads)}", sizes
        sizes = split_sizes(dim, self.tp, self.grain, where=f"{full} ({'output' if column else 'input'} features)")
        start = offsets(sizes)[self.rank]
        return list(range(start, start + sizes[self.rank])), f"grain {self.grain}", sizes
