"""The tensor-parallel pass: split every covered layer's linears over ``tp_size`` ranks, Megatron style.

**Plan** (nothing mutated): for each layer matched to a policy, every linear gets an action with its style,
its global and local ``[out, in]`` shape and which rows/columns this rank keeps; attention head counts are
split by :func:`policyinject.tp_split.split_heads` (whole KV groups, or KV heads replicated when ``tp_size``
exceeds them) and MLP/vocabulary dimensions by ``tp_grain_size``. Attributes the layer's own forward uses to
reshape (the policy's ``tp_attributes`` plus known names such as ``num_heads``, ``num_key_value_groups``,
``split_size``, matched by value) are rewritten per rank on the module instances. The model-level embedding
and output head are vocabulary-parallel (with the logits all-gathered; a tied head shares the embedding's
shard). ``nn.ModuleList`` children that no policy covers go through AutoTP: the model's Hugging Face TP plan
when it has one, else DeepSpeed-style name and structure heuristics; every decision is an action in the plan,
and a layer the heuristics cannot decide safely is refused with a :class:`PlanError`.

**Apply**: each action builds a parallel module from its slices and swaps it in. Slices come from the
in-memory module, or -- for a model created on the meta device with ``checkpoint=`` a safetensors directory
-- straight from the files, each rank reading only its own slices (:mod:`policyinject.checkpoint`).

Example (planning only; no process group is needed to plan):
    >>> from types import SimpleNamespace
    >>> import torch
    >>> from policyinject.passes.base import PassContext
    >>> from policyinject.policy import Policy
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc1 = torch.nn.Linear(8, 32); self.fc2 = torch.nn.Linear(32, 8)
    >>> model = torch.nn.Sequential(Block())
    >>> from policyinject.passes.base import MatchedLayer
    >>> cfg = SimpleNamespace(tensor_parallel=SimpleNamespace(tp_size=2, tp_grain_size=8, tp_group=None, mpu=None,
    ...                       tp_plan=None), checkpoint=None, save_mp_checkpoint_path=None)
    >>> ctx = PassContext(model=model, config=cfg,
    ...                   layers=[MatchedLayer("0", model[0], Policy(Block, styles={"fc2": "row"}, default_style="column"))])
    >>> [(a.path, a.action, a.details.get("local")) for a in TensorParallelPass().plan(ctx)]
    [('0.fc1', 'column', [16, 8]), ('0.fc2', 'row', [8, 16]), ('', 'lint', None)]
"""

from __future__ import annotations

import copy
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn

from ..distributed import TPInfo, resolve_tp
from ..errors import PlanError, UnsupportedError
from ..modules.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       VocabParallelHead, _new_linear)
from ..plan import Action
from ..policy import qkv_rows
from ..policy.model import AttentionSpec, Policy, QKVLayout, Style, is_linear_like, read_size
from ..tp_split import HeadShard, SplitError, head_rows, runs, split_heads, split_sizes, offsets
from .base import Pass, PassContext

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

#: AutoTP: names that make a linear row-parallel (substring of its layer-relative path), as in DeepSpeed.
ROW_NAME_HINTS = ("out_proj", "o_proj", "down_proj", "dense_4h_to_h", "fc2", "c_proj", "attention.dense",
                  "self_attention.dense", "self_attn.dense", "output.dense", "wo", "w2")
#: AutoTP: fused projections whose row layout is unknown without a policy.
FUSED_QKV_HINTS = ("qkv_proj", "query_key_value", "c_attn", "wqkv", "w_pack", "qkv")
#: AutoTP: linears kept replicated (MoE routers).
REPLICATED_HINTS = ("mlp.gate", "block_sparse_moe.gate", "router", "shared_expert_gate")


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
class AttrRewrite:
    path: str  # module path
    attrs: Tuple[Tuple[str, Any], ...]


def _compact(index: Sequence[int]) -> str:
    return ",".join(f"{s}:{s + n}" for s, n in runs(index)) if len(index) else "-"


def _as_config(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return types.SimpleNamespace(**obj)
    return obj


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _shape_out_in(mod: nn.Module) -> Tuple[int, int]:
    w = mod.weight
    if _is_conv1d(mod):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


@attrs.define
class _Heads:
    """Head geometry of one layer and this rank's shard of it."""

    heads: int
    kv_heads: int
    head_dim: int
    shards: List[HeadShard]
    rank: int

    @property
    def mine(self) -> HeadShard:
        return self.shards[self.rank]


class TensorParallelPass(Pass):
    """Shard covered layers over the tensor-parallel group (see the module docstring)."""

    name = NAME

    def enabled(self, config: Any) -> bool:
        tp = getattr(config, "tensor_parallel", None)
        return (tp is not None and int(getattr(tp, "tp_size", 1)) > 1) or bool(getattr(config, "checkpoint", None))

    # ------------------------------------------------------------------------------------------- plan
    def plan(self, ctx: PassContext) -> list:
        tpc = ctx.config.tensor_parallel
        tp = int(tpc.tp_size)
        info = ctx.tp if isinstance(ctx.tp, TPInfo) else resolve_tp(
            tp, tp_group=getattr(tpc, "tp_group", None), mpu=getattr(tpc, "mpu", None), device=ctx.device)
        ctx.tp = info
        planner = _Planner(ctx, tp, int(getattr(tpc, "tp_grain_size", 64) or 1), info.rank)
        actions = planner.run()
        from .. import checkpoint as ckpt

        load = ckpt.plan_checkpoint(ctx, tp)
        if load is not None:
            actions.append(load)
        return actions

    # ------------------------------------------------------------------------------------------ apply
    def apply(self, ctx: PassContext, actions: list) -> None:
        from .. import checkpoint as ckpt

        info: TPInfo = ctx.tp
        if info is None or (info.planning_only and info.world_size > 1):
            raise UnsupportedError(
                f"tensor_parallel.tp_size={info.world_size if info else '?'} was planned without a process group; "
                f"launch with `torchrun --nproc-per-node {info.world_size if info else 'N'} ...` or pass "
                f"tensor_parallel.tp_group")
        load_action = next((a for a in actions if a.action == "load_checkpoint"), None)
        source, meter = ckpt.open_source(ctx, load_action)
        notes = ctx.notes.setdefault(NAME, {})
        saved: Dict[str, torch.Tensor] = {}
        built: Dict[str, nn.Module] = {}
        with meter:
            for a in actions:
                if a.action == "rewrite_attributes":
                    _apply_attributes(ctx.model, a.payload)
                    continue
                if not isinstance(a.payload, Shard):  # replicate, lint, load_checkpoint: nothing to build
                    continue
                shard: Shard = a.payload
                new = _build(ctx, a.path, shard, source, info, built)
                _set_module(ctx.model, a.path, new)
                built[a.path] = new
                release = getattr(source, "release", None)
                if release is not None:
                    release(shard.weight.name, shard.bias.name if shard.bias else None)
                saved.update(_shard_tensors(shard, new))
            ckpt.materialize_rest(ctx, source, built)
        notes["shards"] = saved
        if meter.report:
            notes["load"] = meter.report
        save_path = getattr(ctx.config, "save_mp_checkpoint_path", None)
        if save_path:
            ckpt.save_sharded(ctx, save_path, saved, built)


# ------------------------------------------------------------------------------------------- planner
class _Planner:
    def __init__(self, ctx: PassContext, tp: int, grain: int, rank: int) -> None:
        self.ctx = ctx
        self.tp = tp
        self.grain = grain
        self.rank = rank
        self.model_config = _as_config(ctx.model_config if ctx.model_config is not None
                                       else getattr(ctx.model, "config", None))
        self.actions: List[Action] = []
        self.notes = ctx.notes.setdefault(NAME, {})
        self.notes["heads"] = {}
        self.notes["local_shapes"] = {}
        self.notes["tp_size"] = tp
        self.notes["rank"] = rank
        self.problems: List[str] = []

    def run(self) -> List[Action]:
        layer_actions: List[Action] = []
        for matched in self.ctx.layers:
            layer_actions += self._guard(self._layer, matched.path, matched.module, matched.policy, "policy")
        for path, module, policy, how in self._auto_layers():
            layer_actions += self._guard(self._layer, path, module, policy, how)
        embed, head = self._model_level()
        if self.problems:
            raise PlanError(self.problems)
        return embed + layer_actions + head

    def _guard(self, fn: Any, *args: Any) -> List[Action]:
        try:
            return fn(*args)
        except PlanError as exc:
            self.problems.extend(exc.problems)
            return []

    # ---- heads
    def _heads(self, path: str, layer: nn.Module, attn: Optional[AttentionSpec], styles: Mapping[str, Style]) -> Optional[_Heads]:
        cfg = self.model_config
        heads = kv = hd = None
        if attn is not None:
            heads = read_size(cfg, attn.num_heads)
            kv = read_size(cfg, attn.num_kv_heads)
            hd = read_size(cfg, attn.head_dim)
        else:
            heads = read_size(cfg, AttentionSpec.__attrs_attrs__.num_heads.default)
            kv = read_size(cfg, AttentionSpec.__attrs_attrs__.num_kv_heads.default)
            hd = read_size(cfg, ("head_dim",))
        if heads is None:
            heads, kv = _heads_from_attributes(layer)
        if heads is None:
            return None
        hidden = read_size(cfg, ("hidden_size", "n_embd", "d_model", "dim"))
        # shapes win over the config (Falcon multi-query keeps num_kv_heads = num_heads in its config)
        if attn is not None:
            if attn.q is not None:
                q_out = _shape_out_in(layer.get_submodule(attn.path(attn.q)))[0]
                hd = hd or q_out // heads
                k_out = _shape_out_in(layer.get_submodule(attn.path(attn.k)))[0]
                kv = k_out // hd
            elif attn.qkv is not None:
                out = _shape_out_in(layer.get_submodule(attn.path(attn.qkv)))[0]
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
        shards = split_heads(heads, kv, self.tp, where=f"{path} ({type(layer).__name__})")
        return _Heads(heads, kv, hd, shards, self.rank)

    # ---- one layer
    def _layer(self, path: str, layer: nn.Module, policy: Policy, how: str) -> List[Action]:
        styles, unmatched, uncovered = policy.styles_for(layer)
        if policy.default_style is Style.COLUMN:  # DeepSpeed: any linear containing down_proj is row-parallel
            for name in styles:
                if "down_proj" in name and name not in policy.styles:
                    styles[name] = Style.ROW
        attn, mlp = policy.attention, policy.mlp
        heads = self._heads(path, layer, attn, styles)
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
            t = rel in transposed or _is_conv1d(mod)
            out_f, in_f = _shape_out_in(mod)
            r = role.get(rel)
            if r in ("up", "down") and style in (Style.COLUMN, Style.ROW):
                inter = in_f if r == "down" else out_f
            a = self._linear_action(full, mod, style, r, heads, attn, t, how)
            if "local" in a.details:  # later passes plan before this one applies: tell them the local shapes
                self.notes.setdefault("local_shapes", {})[full] = list(a.details["local"])
            if "heads" in str(a.details.get("split", "")):
                head_parents.append(rel.rpartition(".")[0])
            actions.append(a)
        actions += self._attribute_actions(path, layer, policy, heads, inter, head_parents)
        if heads is not None:
            self.notes["heads"][path] = {"heads": heads.mine.num_heads, "kv_heads": heads.mine.num_kv_heads}
        for rule in unmatched:
            actions.append(Action(NAME, path, type(layer).__name__, "lint",
                                  {"rule": rule, "problem": "matches no submodule", "source": policy.source or how}))
        for name in uncovered:
            actions.append(Action(NAME, f"{path}.{name}", type(layer.get_submodule(name)).__name__, "replicate",
                                  {"reason": "no rule covers this linear; kept whole on every rank"}))
        return actions

    def _linear_action(self, full: str, mod: nn.Module, style: Style, role: Optional[str], heads: Optional[_Heads],
                       attn: Optional[AttentionSpec], transposed: bool, how: str) -> Action:
        out_f, in_f = _shape_out_in(mod)
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
            details.update(local=[len(rows), in_f], rows=_compact(rows), split=split)
            shard = Shard("column", ParamSlice(w, 0, tuple(rows), transposed),
                          ParamSlice(b, 0, tuple(rows)) if b else None, tuple(sizes), 0, (out_f, in_f))
            return Action(NAME, full, cls, "column", details, shard)
        if style in (Style.COLUMN_GATHER, Style.VOCAB_HEAD):
            sizes = split_sizes(out_f, self.tp, self.grain, where=f"{full} (output features)")
            start = offsets(sizes)[self.rank]
            rows = list(range(start, start + sizes[self.rank]))
            details.update(local=[len(rows), in_f], rows=_compact(rows), split=f"grain {self.grain}, gathered")
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
            details.update(local=[out_f, len(cols)], cols=_compact(cols), split=split,
                           bias="added once after all-reduce" if b else "none")
            kind = "row_split_input" if style is Style.ROW_SPLIT_INPUT else "row"
            shard = Shard(kind, ParamSlice(w, 1, tuple(cols), transposed), ParamSlice(b) if b else None, (), start,
                          (out_f, in_f))
            return Action(NAME, full, cls, kind, details, shard)
        raise PlanError(f"{full}: style {style.value!r} is not valid for a linear inside a layer")

    def _column_rows(self, full: str, out_f: int, style: Style, role: Optional[str], heads: Optional[_Heads],
                     attn: Optional[AttentionSpec]) -> Tuple[List[int], str, List[int]]:
        if role in ("q", "k", "v", "qkv") and heads is None:
            raise PlanError(f"{full}: attention head counts are unknown (no model config); give the policy's "
                            f"AttentionSpec.num_heads")
        if role == "q":
            return self._head_split(heads, "q", heads.heads)
        if role in ("k", "v"):
            return self._head_split(heads, "kv", heads.kv_heads)
        if role == "qkv":
            rows = _fused_qkv_rows(attn.qkv_layout, heads)
            sizes = [(s.num_heads + 2 * s.num_kv_heads) * heads.head_dim for s in heads.shards]
            return rows, f"{attn.qkv_layout.value} q/k/v heads ({_head_text(heads)})", sizes
        if role == "gate_up" or style is Style.PACKED_COLUMN:
            if out_f % 2:
                raise PlanError(f"{full}: packed gate|up projection has an odd number ({out_f}) of output features")
            half = out_f // 2
            sizes = split_sizes(half, self.tp, self.grain, where=f"{full} (packed halves of {half})")
            start = offsets(sizes)[self.rank]
            mine = list(range(start, start + sizes[self.rank]))
            return mine + [half + i for i in mine], f"packed 2 x grain {self.grain}", [2 * s for s in sizes]
        return self._generic(full, out_f, heads, column=True)

    def _row_cols(self, full: str, in_f: int, role: Optional[str], heads: Optional[_Heads]) -> Tuple[List[int], str]:
        if role == "o":
            if heads is None:
                raise PlanError(f"{full}: attention head counts are unknown (no model config)")
            rows, split, _ = self._head_split(heads, "q", heads.heads)
            if len(heads.shards) and in_f != heads.heads * heads.head_dim:
                raise PlanError(f"{full}: {in_f} input features do not match {heads.heads} heads of size {heads.head_dim}")
            return rows, split
        rows, split, _ = self._generic(full, in_f, heads, column=False)
        return rows, split

    def _head_split(self, heads: _Heads, which: str, total: int) -> Tuple[List[int], str, List[int]]:
        d = heads.head_dim
        mine = heads.mine.q_heads if which == "q" else heads.mine.kv_heads
        sizes = [(len(s.q_heads) if which == "q" else len(s.kv_heads)) * d for s in heads.shards]
        rep = f", replicated x{heads.mine.kv_replicas}" if which == "kv" and heads.mine.kv_replicas > 1 else ""
        return head_rows(mine, d), f"{which} heads {_compact(mine)} of {total}{rep}", sizes

    def _generic(self, full: str, dim: int, heads: Optional[_Heads], column: bool) -> Tuple[List[int], str, List[int]]:
        """A linear without a role: split by heads when its size is a head multiple, else by grain."""
        if heads is not None:
            d = heads.head_dim
            if dim == heads.heads * d:
                return self._head_split(heads, "q", heads.heads)
            if column and dim == heads.kv_heads * d:
                return self._head_split(heads, "kv", heads.kv_heads)
            if column and heads.heads == heads.kv_heads and dim == 3 * heads.heads * d:
                rows = [h * 3 * d + i for h in heads.mine.q_heads for i in range(3 * d)]
                sizes = [3 * d * s.num_heads for s in heads.shards]
                return rows, f"per-head fused q/k/v heads {_compact(heads.mine.q_heads)}", sizes
        sizes = split_sizes(dim, self.tp, self.grain, where=f"{full} ({'output' if column else 'input'} features)")
        start = offsets(sizes)[self.rank]
        return list(range(start, start + sizes[self.rank])), f"grain {self.grain}", sizes

    # ---- attributes
    def _attribute_actions(self, path: str, layer: nn.Module, policy: Policy, heads: Optional[_Heads],
                           inter: Optional[int], head_parents: Sequence[str]) -> List[Action]:
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
                rewrites += _collect_rewrites(layer, path, attn.module, dict(attn.tp_attributes),
                                              DEFAULT_ATTENTION_ATTRIBUTES, q)
            else:  # no attention role: the modules that own head-split linears
                for root in dict.fromkeys(head_parents):
                    rewrites += _collect_rewrites(layer, path, root, {}, DEFAULT_ATTENTION_ATTRIBUTES, q, deep=False)
        mlp = policy.mlp
        if inter is not None and mlp is not None:
            sizes = split_sizes(inter, self.tp, self.grain)
            q = {"intermediate": (inter, sizes[self.rank])}
            rewrites += _collect_rewrites(layer, path, mlp.module, dict(mlp.tp_attributes), DEFAULT_MLP_ATTRIBUTES, q)
        out = []
        for rw in rewrites:
            details = {k: v for k, v in rw.attrs}
            mod = self.ctx.module(rw.path)
            out.append(Action(NAME, rw.path, type(mod).__name__, "rewrite_attributes", details, rw))
        return out

    # ---- AutoTP
    def _auto_layers(self) -> List[Tuple[str, nn.Module, Policy, str]]:
        model = self.ctx.model
        covered = [m.path for m in self.ctx.layers]

        def inside(p: str) -> bool:
            return any(p == c or p.startswith(c + ".") or c == "" for c in covered)

        hf = self._hf_plan_policies()
        out: List[Tuple[str, nn.Module, Policy, str]] = []
        cache: Dict[type, Tuple[Policy, str]] = {}
        for lpath, container in model.named_modules():
            if not isinstance(container, nn.ModuleList) or inside(lpath):
                continue
            for name, child in container.named_children():
                cpath = f"{lpath}.{name}" if lpath else name
                if inside(cpath) or not any(is_linear_like(m) for m in child.modules()):
                    continue
                cls = type(child)
                if cls not in cache:
                    if cls in hf:
                        cache[cls] = (hf[cls], "autotp:hf_plan")
                    else:
                        cache[cls] = (self._guard_policy(cpath, child), "autotp:heuristic")
                policy, how = cache[cls]
                if policy is not None:
                    out.append((cpath, child, policy, how))
        return out

    def _guard_policy(self, path: str, layer: nn.Module) -> Optional[Policy]:
        try:
            return heuristic_policy(layer, path)
        except PlanError as exc:
            self.problems.extend(exc.problems)
            return None

    def _hf_plan_policies(self) -> Dict[type, Policy]:
        plan = _hf_plan(self.ctx)
        if not plan:
            return {}
        from ..policy.shortforms import convert_hf_plan

        conv = convert_hf_plan(plan, self.ctx.model, source="autotp:hf_plan")
        for msg in conv.lint:
            self.actions.append(Action(NAME, "", type(self.ctx.model).__name__, "lint", {"message": msg}))
        self._hf_model_policy = conv.model_policies[0] if conv.model_policies else None
        return {p.layer: p for p in conv.policies}

    # ---- embedding and head
    def _model_level(self) -> Tuple[List[Action], List[Action]]:
        model = self.ctx.model
        mp = self.ctx.model_policy
        styles: Dict[str, Style] = {}
        how = "policy"
        if mp is not None:
            if mp.embed:
                styles[mp.embed] = Style.VOCAB_EMBEDDING
            if mp.lm_head:
                styles[mp.lm_head] = Style.VOCAB_HEAD
            styles.update(mp.styles)
        else:
            hf_mp = getattr(self, "_hf_model_policy", None)
            if hf_mp is None and _hf_plan(self.ctx):
                self._hf_plan_policies()
                hf_mp = getattr(self, "_hf_model_policy", None)
            if hf_mp is not None:
                styles.update(hf_mp.styles)
                how = "autotp:hf_plan"
            # the embedding and head of a Hugging Face model are found even without a plan entry for them
            for getter, style in (("get_input_embeddings", Style.VOCAB_EMBEDDING),
                                  ("get_output_embeddings", Style.VOCAB_HEAD)):
                fn = getattr(model, getter, None)
                try:
                    mod = fn() if callable(fn) else None
                except Exception:
                    mod = None
                if mod is None:
                    continue
                p = _path_of(model, mod)
                if p is not None and not any(s is style for s in styles.values()) and p not in styles:
                    styles[p] = style
                    how = "autotp:structure" if how == "policy" else how
        embed_actions: List[Action] = []
        head_actions: List[Action] = []
        embed_paths: Dict[int, str] = {}
        embed_sizes: Dict[str, List[int]] = {}
        for p, style in styles.items():
            if style is not Style.VOCAB_EMBEDDING:
                continue
            mod = model.get_submodule(p)
            if not isinstance(mod, nn.Embedding):
                self.problems.append(f"{p}: vocab_embedding needs an nn.Embedding, found {type(mod).__name__}")
                continue
            V, D = mod.weight.shape
            sizes = split_sizes(int(V), self.tp, self.grain, where=f"{p} (vocabulary)")
            start = offsets(sizes)[self.rank]
            rows = tuple(range(start, start + sizes[self.rank]))
            details = {"style": style.value, "global": [int(V), int(D)], "local": [sizes[self.rank], int(D)],
                       "rows": _compact(rows), "split": f"vocab, grain {self.grain}", "gather": "all-reduce"}
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
                self.problems.append(f"{p}: style {style.value} needs a linear, found {type(mod).__name__}")
                continue
            tie = embed_paths.get(id(mod.weight))
            a = self._linear_action(p, mod, style, None, None, None, _is_conv1d(mod), how)
            if tie is not None and a.payload is not None and a.payload.kind == "vocab_head" \
                    and list(a.payload.out_sizes) == embed_sizes[tie]:
                a = attrs.evolve(a, details={**a.details, "tied": tie}, payload=attrs.evolve(a.payload, tie_to=tie))
            head_actions.append(a)
        if not styles:
            head_actions.append(Action(NAME, "", type(model).__name__, "lint",
                                       {"message": "no embedding or output head found; they stay replicated"}))
        return embed_actions + self.actions, head_actions


def _head_text(heads: _Heads) -> str:
    s = heads.mine
    return f"q {_compact(s.q_heads)} of {heads.heads}, kv {_compact(s.kv_heads)} of {heads.kv_heads}"


def _fused_qkv_rows(layout: QKVLayout, heads: _Heads) -> List[int]:
    """Global rows of this rank's q, k and v heads, ordered in the same layout with the local head counts."""
    s, d = heads.mine, heads.head_dim
    gq, gk, gv = qkv_rows(layout, heads.heads, heads.kv_heads, d)
    lq, lk, lv = qkv_rows(layout, s.num_heads, s.num_kv_heads, d)
    rows = torch.empty(len(lq) + len(lk) + len(lv), dtype=torch.long)
    rows[lq] = gq.view(heads.heads, d)[s.q_heads].flatten()
    rows[lk] = gk.view(heads.kv_heads, d)[s.kv_heads].flatten()
    rows[lv] = gv.view(heads.kv_heads, d)[s.kv_heads].flatten()
    return rows.tolist()


def _heads_from_attributes(layer: nn.Module) -> Tuple[Optional[int], Optional[int]]:
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


def _collect_rewrites(layer: nn.Module, path: str, root: str, explicit: Mapping[str, str],
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


def _apply_attributes(model: nn.Module, rw: AttrRewrite) -> None:
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


def _path_of(model: nn.Module, target: nn.Module) -> Optional[str]:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _hf_plan(ctx: PassContext) -> Optional[Mapping[str, str]]:
    """The Hugging Face plan to use for AutoTP: the config's ``tp_plan`` dict, else the model's own."""
    user = getattr(ctx.config.tensor_parallel, "tp_plan", None)
    if isinstance(user, Mapping) and user:
        return None  # the pipeline already turned a user plan into policies
    model = ctx.model
    plan = getattr(model, "_tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    cfg = getattr(model, "config", None)
    plan = getattr(cfg, "base_model_tp_plan", None) if cfg is not None else None
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    return None


def heuristic_policy(layer: nn.Module, path: str = "") -> Policy:
    """DeepSpeed-style AutoTP for one layer instance with no policy and no HF plan.

    A linear is row-parallel when its path contains one of :data:`ROW_NAME_HINTS` or when it comes right
    before a norm (``LayerNorm``, an RMSNorm-like class, or a name with ``ln_``/``layer_norm``/``LayerNorm``)
    in module order; routers (:data:`REPLICATED_HINTS`) stay replicated; every other linear is
    column-parallel. Refused (:class:`PlanError`) when a fused QKV projection is found (its row layout is
    unknown), when no linear is row-parallel, or when a column-parallel linear comes after the last
    row-parallel one (its sharded output would leave the layer).

    Example:
        >>> import torch
        >>> class Blk(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q = torch.nn.Linear(8, 8); self.out_proj = torch.nn.Linear(8, 8)
        ...         self.norm = torch.nn.LayerNorm(8); self.up = torch.nn.Linear(8, 16)
        ...         self.down_proj = torch.nn.Linear(16, 8)
        >>> sorted((k, v.value) for k, v in heuristic_policy(Blk()).styles.items())
        [('down_proj', 'row'), ('out_proj', 'row'), ('q', 'column'), ('up', 'column')]
        >>> b = Blk(); b.down_proj, b.w_out = None, torch.nn.Linear(16, 8)  # a name the heuristics do not know
        >>> heuristic_policy(b)
        Traceback (most recent call last):
        ...
        policyinject.errors.PlanError: AutoTP: cannot decide a safe split for Blk: column-parallel up, w_out come after the last row-parallel linear, so their sharded output would leave the layer; give injection_policy={Blk: (...)}
    """
    where = f"{path} ({type(layer).__name__})" if path else type(layer).__name__
    order: List[Tuple[str, str]] = []  # (kind, name)
    for name, mod in layer.named_modules():
        if not name:
            continue
        if is_linear_like(mod):
            order.append(("linear", name))
        elif _is_norm(name, mod):
            order.append(("norm", name))
    linears = [n for k, n in order if k == "linear"]
    styles: Dict[str, Style] = {}
    for i, (kind, name) in enumerate(order):
        if kind != "linear":
            continue
        low = name.lower()
        last = low.rsplit(".", 1)[-1]
        if any(low.endswith(h) for h in REPLICATED_HINTS):
            styles[name] = Style.REPLICATE
        elif last in FUSED_QKV_HINTS:
            raise PlanError(f"AutoTP: {where}.{name} looks like a fused QKV projection whose row layout is unknown; "
                            f"give a Policy with AttentionSpec(qkv={name.rsplit('.', 1)[-1]!r}, qkv_layout=...) "
                            f"through injection_policy")
        elif any(h in low.split(".")[-2:] or low.endswith(h) or ("." + h) in low for h in ROW_NAME_HINTS) \
                or (i + 1 < len(order) and order[i + 1][0] == "norm"):
            styles[name] = Style.ROW
        else:
            styles[name] = Style.COLUMN
    rows = [n for n in linears if styles[n] is Style.ROW]
    if linears and not rows:
        raise PlanError(f"AutoTP: cannot decide a safe split for {where}: none of its linears "
                        f"({', '.join(linears)}) looks row-parallel; give injection_policy={{{type(layer).__name__}: "
                        f"('<row-parallel linear>', ...)}}")
    last_row = max(linears.index(n) for n in rows) if rows else -1
    trailing = [n for n in linears[last_row + 1:] if styles[n] is Style.COLUMN]
    if trailing:
        raise PlanError(f"AutoTP: cannot decide a safe split for {where}: column-parallel {', '.join(trailing)} "
                        f"come after the last row-parallel linear, so their sharded output would leave the layer; "
                        f"give injection_policy={{{type(layer).__name__}: (...)}}")
    return Policy(layer=type(layer), styles=styles, source="autotp:heuristic")


def _is_norm(name: str, mod: nn.Module) -> bool:
    if isinstance(mod, nn.LayerNorm):
        return True
    cls = type(mod).__name__
    last = name.rsplit(".", 1)[-1]
    return cls.endswith("Norm") or "RMSNorm" in cls or last in ("LayerNorm", "layer_norm", "ln_1", "ln_2") \
        or "layernorm" in last.lower()


# ------------------------------------------------------------------------------------------- apply helpers
def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _build(ctx: PassContext, path: str, shard: Shard, source: Any, info: TPInfo, built: Mapping[str, nn.Module]) -> nn.Module:
    old = ctx.model.get_submodule(path)
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


def _shard_tensors(shard: Shard, new: nn.Module) -> Dict[str, torch.Tensor]:
    """Original tensor name -> this rank's local tensor (what ``save_mp_checkpoint_path`` writes)."""
    out: Dict[str, torch.Tensor] = {}
    if shard.tie_to is None:
        out[shard.weight.name] = new.weight
    if shard.bias is not None and getattr(new, "bias", None) is not None:
        out[shard.bias.name] = new.bias
    return out
