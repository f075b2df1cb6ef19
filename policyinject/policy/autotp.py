"""AutoTP: policies for layers no user form or plugin covers, used only when tensor parallelism is asked for.

``nn.ModuleList`` children that hold linears and that no policy covers get a policy from the model's own
Hugging Face plan (``model._tp_plan`` / ``config.base_model_tp_plan``) when it has one (and the config gives
no ``tensor_parallel.tp_plan`` mapping), else from DeepSpeed-style name and structure heuristics
(:func:`heuristic_policy`). A layer the heuristics cannot decide safely is refused with a
:class:`~policyinject.errors.PlanError`.

Example:
    >>> import torch
    >>> class Blk(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.up = torch.nn.Linear(4, 8); self.down_proj = torch.nn.Linear(8, 4)
    >>> model = torch.nn.Module(); model.layers = torch.nn.ModuleList([Blk(), Blk()])
    >>> found = auto_layers(model, covered=[], hf_policies={})
    >>> [(f.path, f.resolved_by.value) for f in found.layers]
    [('layers.0', 'autotp:heuristic'), ('layers.1', 'autotp:heuristic')]
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from torch import nn

from ..errors import PlanError
from .model import ModelPolicy, Policy, Style, is_linear_like
from .resolved import ResolvedBy, ResolvedLayer

__all__ = ["heuristic_policy", "auto_layers", "model_hf_plan", "hf_plan_policies", "AutoLayers",
           "ROW_NAME_HINTS", "FUSED_QKV_HINTS", "REPLICATED_HINTS"]

#: AutoTP: names that make a linear row-parallel (substring of its layer-relative path), as in DeepSpeed.
ROW_NAME_HINTS = ("out_proj", "o_proj", "down_proj", "dense_4h_to_h", "fc2", "c_proj", "attention.dense",
                  "self_attention.dense", "self_attn.dense", "output.dense", "wo", "w2")
#: AutoTP: fused projections whose row layout is unknown without a policy.
FUSED_QKV_HINTS = ("qkv_proj", "query_key_value", "c_attn", "wqkv", "w_pack", "qkv")
#: AutoTP: linears kept replicated (MoE routers).
REPLICATED_HINTS = ("mlp.gate", "block_sparse_moe.gate", "router", "shared_expert_gate")


@attrs.define
class AutoLayers:
    """What AutoTP resolved: the layers, and the problems of layers it refused."""

    layers: List[ResolvedLayer] = attrs.field(factory=list)
    problems: List[str] = attrs.field(factory=list)


def model_hf_plan(model: nn.Module, config_plan: Any = None) -> Optional[Mapping[str, str]]:
    """The model's own Hugging Face plan for AutoTP (None when the config gives a ``tp_plan`` mapping).

    Example:
        >>> model_hf_plan(nn.Linear(2, 2)) is None
        True
    """
    if isinstance(config_plan, Mapping) and config_plan:
        return None  # a user plan is resolved as tp_plan policies instead
    plan = getattr(model, "_tp_plan", None)
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    cfg = getattr(model, "config", None)
    plan = getattr(cfg, "base_model_tp_plan", None) if cfg is not None else None
    if isinstance(plan, Mapping) and plan:
        return dict(plan)
    return None


def hf_plan_policies(model: nn.Module, plan: Optional[Mapping[str, str]]
                     ) -> Tuple[Dict[type, Policy], Optional[ModelPolicy], List[str]]:
    """(layer class -> policy, the model-level policy, lint messages) of the model's own HF plan."""
    if not plan:
        return {}, None, []
    from .shortforms import convert_hf_plan

    known, lint = split_unknown_styles(plan)
    conv = convert_hf_plan(known, model, source=ResolvedBy.HF_PLAN.value)
    model_policy = conv.model_policies[0] if conv.model_policies else None
    return {p.layer: p for p in conv.policies}, model_policy, lint + list(conv.lint)


def split_unknown_styles(plan: Mapping[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """(the entries of a model's own HF plan whose style policyinject knows, a lint line per other entry).

    A model's plan may use styles policyinject does not implement (``mla_kv_a_proj``, ``local_params``,
    ``all_reduce``, ``embedding_colwise``, ...): those modules stay replicated and the plan says so, instead of
    the whole plan being refused. (A plan the user writes in ``tensor_parallel.tp_plan`` is validated
    strictly: a typo there is a ConfigError naming the key.)

    Example:
        >>> split_unknown_styles({"layers.*.q_proj": "colwise", "layers.*.kv_a_proj": "mla_kv_a_proj"})[1]
        ["autotp:hf_plan: 'layers.*.kv_a_proj' uses style 'mla_kv_a_proj' that policyinject does not implement (multi-head latent attention is not implemented); that module stays replicated"]
    """
    from ..config.tp_plan import HF_STYLE_TABLE, HF_UNSUPPORTED_STYLES

    known: Dict[str, str] = {}
    lint: List[str] = []
    for key, style in plan.items():
        if isinstance(style, str) and (style in HF_STYLE_TABLE or style.startswith("megamoe")):
            known[key] = style
            continue
        why = HF_UNSUPPORTED_STYLES.get(style, "unknown style") if isinstance(style, str) else "not a style name"
        lint.append(f"{ResolvedBy.HF_PLAN.value}: {key!r} uses style {style!r} that policyinject does not "
                    f"implement ({why}); that module stays replicated")
    return known, lint


def auto_layers(model: nn.Module, covered: Sequence[str], hf_policies: Mapping[type, Policy]) -> AutoLayers:
    """AutoTP policies for the ``nn.ModuleList`` children outside ``covered`` paths that hold linears.

    One decision per layer class: the HF plan's policy when it has one for the class, else
    :func:`heuristic_policy` (whose refusals are collected in ``problems``).
    """

    def inside(p: str) -> bool:
        return any(p == c or p.startswith(c + ".") or c == "" for c in covered)

    out = AutoLayers()
    cache: Dict[type, Tuple[Optional[Policy], ResolvedBy]] = {}
    for lpath, container in model.named_modules():
        if not isinstance(container, nn.ModuleList) or inside(lpath):
            continue
        for name, child in container.named_children():
            cpath = f"{lpath}.{name}" if lpath else name
            if inside(cpath) or not any(is_linear_like(m) for m in child.modules()):
                continue
            if is_linear_like(child) or isinstance(child, nn.Embedding):
                continue  # a list of per-codebook heads or embeddings (MusicGen): kept replicated
            cls = type(child)
            if cls not in cache:
                if cls in hf_policies and _covers_a_linear(hf_policies[cls], child):
                    cache[cls] = (hf_policies[cls], ResolvedBy.HF_PLAN)
                else:
                    try:
                        cache[cls] = (heuristic_policy(child, cpath), ResolvedBy.HEURISTIC)
                    except PlanError as exc:
                        out.problems.extend(exc.problems)
                        cache[cls] = (None, ResolvedBy.HEURISTIC)
            policy, how = cache[cls]
            if policy is not None:
                out.layers.append(ResolvedLayer(cpath, child, policy, how))
    return out


def _covers_a_linear(policy: Policy, layer: nn.Module) -> bool:
    """False for an HF plan that names none of the layer's linears (only its experts): heuristics decide then."""
    styles = policy.styles_for(layer)[0]
    return any(s is not Style.REPLICATE for s in styles.values())


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
    return Policy(layer=type(layer), styles=styles, source=ResolvedBy.HEURISTIC.value)


def _is_norm(name: str, mod: nn.Module) -> bool:
    if isinstance(mod, nn.LayerNorm):
        return True
    cls = type(mod).__name__
    last = name.rsplit(".", 1)[-1]
    return cls.endswith("Norm") or "RMSNorm" in cls or last in ("LayerNorm", "layer_norm", "ln_1", "ln_2") \
        or "layernorm" in last.lower()
