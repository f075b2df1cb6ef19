"""The ``kernel_inject`` pass: replace every layer a policy covers by modules running the fused kernels.

Asked for by ``replace_with_kernel_inject=True`` (alias ``kernel_inject``). For each matched layer:

- **block level** -- the policy gives a known wiring (``pre_norm``, ``parallel``, ``post_norm``) and its
  roles describe every parameter of the layer: the layer becomes an
  :class:`~policyinject.modules.block.InjectedBlock` (fused QKV, fused gate|up, residual adds fused into the
  norms, SDPA attention, a ``run`` core for the decode engine);
- **submodule level** -- an ``opaque`` policy (Mixtral's MoE layer) or a layer holding parameters its policy
  does not describe (GPT-2 / BERT with cross-attention): the attention module becomes an
  :class:`~policyinject.modules.attention.InjectedAttention` (when q/k/v/o are its direct children), a named
  MLP module an :class:`~policyinject.modules.mlp.InjectedMLP`, each norm a fused norm; the layer's own
  forward stays.

The model-level final norm (``ModelPolicy.final_norm``) becomes a fused norm too. Planning checks every role
path, head counts against projection shapes, activations against the policy, and the model's attention
implementation, and raises :class:`~policyinject.errors.PlanError` listing every problem, before anything is
touched. Head counts come from the tensor-parallel layout (``plan.tensor_parallel.heads[layer_path]``) when
tensor parallelism planned first, else from the layer's geometry
(:func:`~policyinject.policy.geometry.layer_geometry`: the policy's size sources read against the layer's config
-- the text sub-config inside a vision-language wrapper --, the layer's own attributes, projection shapes), so a
model without any config injects too. Apply records an
:class:`~policyinject.plan_fields.InjectionSummary` in ``plan.injection`` and, without tensor parallelism, a
:class:`~policyinject.plan_fields.DecodeDescription` in ``plan.decode`` (the engine's decoder, falling back
to the model's own ``generate`` when the decode engine cannot run the transformed model).

Example:
    >>> import torch
    >>> from policyinject.testing.presets import tiny_model
    >>> from policyinject.config import load_config
    >>> from policyinject.passes.base import PassContext, ResolvedLayer
    >>> from policyinject_plugins.llama import LLAMA_LAYER, LLAMA_CAUSAL_LM
    >>> model = tiny_model("llama")
    >>> cfg = load_config(None, replace_with_kernel_inject=True, kernel_backend="torch")
    >>> layers = [ResolvedLayer(f"model.layers.{i}", l, LLAMA_LAYER) for i, l in enumerate(model.model.layers)]
    >>> ctx = PassContext(model=model, config=cfg, layers=layers, model_policy=LLAMA_CAUSAL_LM,
    ...                   model_config=model.config)
    >>> p = KernelInjectPass()
    >>> actions = p.plan(ctx)
    >>> [(a.path, a.details["replace"]) for a in actions]
    [('model.layers.0', 'InjectedBlock'), ('model.layers.1', 'InjectedBlock'), ('model.norm', 'FusedRMSNorm')]
    >>> p.apply(ctx, actions)
    >>> type(model.model.layers[0]).__name__, ctx.plan.injection.blocks["model.layers.0"].kv_heads
    ('InjectedBlock', 2)
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from .._nn import join_path as _join
from .._nn import set_submodule as _set
from .._nn import submodule_or_none as _sub
from ..errors import PlanError, PolicyError
from ..plan import Action
from ..plan_fields import DecodeDescription, InjectedLayerInfo, InjectionSummary
from ..policy.geometry import config_for_layer, hidden_size, layer_geometry

from .base import Pass, PassContext
from .inject_layer import LayerInjection, norm_class, plan_layer

#: Mask formats the injected attention consumes (4-D bool or additive masks, or None).
_ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager")


@attrs.frozen
class DecodeGemv:
    """Payload of the ``decode gemv`` action: swap 16-bit linears of the injected layers for ``DecodeLinear``."""

    backend: str
    lm_head: Optional[str]


@attrs.frozen
class FinalNorm:
    """Payload of the final-norm ``replace`` action."""

    backend: str


class KernelInjectPass(Pass):
    """Fused-kernel injection; see the module docstring."""

    name = "kernel_inject"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """``replace_with_kernel_inject`` (alias ``kernel_inject``)."""
        return bool(config.replace_with_kernel_inject)

    # ---------------------------------------------------------------------------------------------- plan
    def plan(self, ctx: PassContext) -> list:
        backend = str(ctx.config.kernel_backend)
        problems: list = []
        actions: list = []
        impl = getattr(ctx.model_config, "_attn_implementation", None)
        if impl not in _ATTN_IMPLEMENTATIONS and ctx.layers:
            problems.append(
                f"the model uses attn_implementation={impl!r}, whose masks the injected attention cannot read; "
                f"load it with attn_implementation='sdpa' (or 'eager')")
        self._experts = None  # the expert layout, resolved once when the first MoE layer is planned
        for matched in ctx.layers:
            try:
                action = self._plan_layer(ctx, matched, backend)
            except PlanError as exc:
                problems.extend(exc.problems)
                continue
            if action is not None:
                actions.append(action)
        final = self._plan_final_norm(ctx, backend)
        if final is not None:
            actions.append(final)
        gemv = self._plan_decode_gemv(ctx, backend)
        if gemv is not None:
            actions.append(gemv)
        if problems:
            raise PlanError(problems)
        return actions

    def _plan_decode_gemv(self, ctx: PassContext, backend: str) -> Optional[Action]:
        """On CUDA, 16-bit linears of the injected layers and the output head get the decode GEMV.

        ``DecodeLinear`` runs the GEMV kernel for one row (a batch-1 decode step) and cuBLAS otherwise: on
        the H100 the GEMV reads the weights 6-25% faster than cuBLAS at batch 1 and loses at batch 4 and
        more (benchmarks/NOTES.md), hence ``max_m=1``. Small weights (under 2**20 elements) stay on cuBLAS.
        """
        if ctx.device is None or ctx.device.type != "cuda" or backend == "torch" or not ctx.layers:
            return None
        head = ctx.model_policy.lm_head if ctx.model_policy is not None else None
        return Action(self.name, "", type(ctx.model).__name__, "decode gemv",
                      {"max_rows": DECODE_GEMV_MAX_ROWS, "min_elements": DECODE_GEMV_MIN_ELEMENTS,
                       "lm_head": head or "-"}, DecodeGemv(backend, head))

    def _heads(self, ctx: PassContext, path: str, layer: Any, policy: Any, where: str) -> tuple:
        """(heads, kv heads, head_dim) of one layer on this rank: the TP layout's local counts when tensor
        parallelism planned first, else the layer's geometry (:func:`~policyinject.policy.geometry.layer_geometry`:
        the policy's size sources, the layer's own attributes, projection shapes)."""
        try:
            counts = layer_geometry(layer, policy.attention, ctx.model_config)
        except (PolicyError, AttributeError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: reading head counts failed: {exc}") from None
        heads, kv, head_dim = counts.heads, counts.kv_heads, counts.head_dim
        if heads is None:
            cfg = config_for_layer(layer, policy.attention, ctx.model_config)
            raise PlanError(f"{where}: no head count: the policy's num_heads source "
                            f"({policy.attention.num_heads!r}) gives none from "
                            f"{'no model config' if cfg is None else type(cfg).__name__}, and no module of the "
                            "layer has a num_heads / num_attention_heads / n_head attribute; give num_heads in the "
                            "AttentionSpec (an int, or a callable (layer, config) -> int)")
        if head_dim is None:
            cfg = config_for_layer(layer, policy.attention, ctx.model_config)
            raise PlanError(f"{where}: cannot derive head_dim (hidden size {hidden_size(cfg)}, "
                            f"{heads} heads); give head_dim in the AttentionSpec")
        layout = ctx.plan.tensor_parallel
        local = layout.heads.get(path) if layout is not None else None
        if local is not None:
            heads, kv = local.heads, local.kv_heads
        return heads, kv, head_dim

    def _plan_layer(self, ctx: PassContext, matched: Any, backend: str) -> Action:
        policy, layer, path = matched.policy, matched.module, matched.path
        if policy.attention is None:
            return Action(self.name, path, type(layer).__name__, "keep",
                          {"reason": "the policy describes no attention role"})
        where = f"{path} ({type(layer).__name__}, policy from {policy.source or 'user'})"
        heads = self._heads(ctx, path, layer, policy, where)
        moe = None
        if policy.moe_for(layer) is not None and ctx.config.moe.enabled:
            from .moe_inject import plan_moe, resolve_expert_layout

            if self._experts is None:
                self._experts = resolve_expert_layout(ctx.config, ctx.tp)
            moe = plan_moe(ctx, path, layer, policy, self._experts, backend)
        return plan_layer(path, layer, policy, heads, backend, ctx.plan.tensor_parallel, moe=moe)

    def _plan_final_norm(self, ctx: PassContext, backend: str) -> Optional[Action]:
        mp = ctx.model_policy
        if mp is None or mp.final_norm is None or not ctx.layers:
            return None
        module = _sub(ctx.model, mp.final_norm.path)
        if module is None or not any(True for _ in module.parameters()):
            return None  # e.g. OPT-350m has no final norm
        return Action(self.name, mp.final_norm.path, type(module).__name__, "replace",
                      {"replace": norm_class(mp.final_norm.kind), "backend": backend}, FinalNorm(backend))

    # --------------------------------------------------------------------------------------------- apply
    def apply(self, ctx: PassContext, actions: list) -> None:
        from ..modules.attention import InjectedAttention
        from ..modules.block import InjectedBlock, norm_from_spec
        from ..modules.mlp import InjectedMLP

        summary = InjectionSummary()
        ctx.plan.injection = summary
        for action in actions:
            plan = action.payload
            if plan is None:
                continue
            if isinstance(plan, DecodeGemv):
                layer_paths = [a.path for a in actions if isinstance(a.payload, LayerInjection)]
                summary.decode_gemv_linears = _use_decode_gemv(ctx, layer_paths, plan.backend, plan.lm_head)
                continue
            if isinstance(plan, FinalNorm):
                _set(ctx.model, action.path, norm_from_spec(ctx.model, ctx.model_policy.final_norm, plan.backend))
                continue
            layer = ctx.module(action.path)
            ctx.building = action.path
            policy = plan.policy
            counts = dict(num_heads=plan.heads, num_kv_heads=plan.kv_heads, head_dim=plan.head_dim)
            layer_config = config_for_layer(layer, policy.attention, ctx.model_config)
            moe = None
            if plan.moe is not None:
                from .moe_inject import build_moe

                moe = build_moe(plan.moe, layer.get_submodule(plan.moe.spec.module), layer_config)
            if plan.mode == "block":
                block = InjectedBlock.build(layer, policy, backend=plan.backend, model_config=layer_config,
                                            mlp_module=moe, **counts)
                _set(ctx.model, action.path, block)
                del layer
                ctx.replaced(action.path)  # the original layer (its unfused weights) is freed now, not at the end
                summary.blocks[action.path] = InjectedLayerInfo(plan.heads, plan.kv_heads, plan.head_dim,
                                                                plan.kind.value)
                continue
            offset = policy.norms[0].weight_offset if policy.norms else 0.0
            built = []  # every replacement of the layer is built before any is swapped in
            for sub, what in plan.replace:
                if what == "attention":
                    a = policy.attention
                    new = InjectedAttention.build(layer.get_submodule(sub), a, backend=plan.backend,
                                                  norm_offset=offset, model_config=layer_config, **counts)
                elif what == "mlp":
                    new = InjectedMLP.build(layer.get_submodule(sub), policy.mlp, plan.backend)
                elif what == "moe":
                    new = moe
                else:
                    new = norm_from_spec(layer, policy.norms[int(what[5:])], plan.backend)
                built.append((sub, new))
            for sub, new in built:
                _set(layer, sub, new)
            summary.submodules[action.path] = [sub for sub, _ in plan.replace]
        ctx.building = None
        self._install_decoder(ctx)

    @staticmethod
    def _install_decoder(ctx: PassContext) -> None:
        """Let ``engine.generate`` use the decode engine (static KV cache, eager steps) on injected models.

        Records a :class:`DecodeDescription` whose ``problems`` say why the decode engine cannot run the
        transformed model (then ``generate`` falls back to the model's own); the ``cuda_graph`` pass
        replaces it with the graphed one. Under tensor parallelism the decode engine runs the sharded blocks
        (each rank its heads; the all-reduces of the row-parallel linears inside each step).
        """
        from ..decode.runner import decode_problems

        ctx.plan.decode = decode_description(ctx.config, use_graphs=False, when_unsupported="fallback",
                                             problems=decode_problems(ctx.model, ctx.model_policy, ctx.model_config))


def decode_description(config: Any, use_graphs: bool, when_unsupported: str, problems: Any = ()) -> DecodeDescription:
    """The decode description of ``config`` (an ``InferenceConfig``): cache length, batch, graph cache, backend.

    Example:
        >>> from policyinject.config import load_config
        >>> decode_description(load_config(None, max_out_tokens=64), False, "fallback").max_len
        64
    """
    return DecodeDescription(use_graphs=use_graphs, when_unsupported=when_unsupported,
                             max_len=int(config.max_out_tokens), batch_capacity=config.max_batch_size,
                             graph_cache_size=int(config.cuda_graph_cache_size), backend=str(config.kernel_backend),
                             problems=tuple(problems))


#: Rows up to which ``DecodeLinear`` runs the GEMV kernel (batch-1 decode), and the smallest weight it takes.
DECODE_GEMV_MAX_ROWS = 1
DECODE_GEMV_MIN_ELEMENTS = 1 << 20


def _use_decode_gemv(ctx: PassContext, layer_paths: list, backend: str, head: Optional[str]) -> int:
    """Swap plain 16-bit ``nn.Linear``s of the injected layers (and the head) for ``DecodeLinear``; how many."""
    from ..modules.fast_linear import DecodeLinear

    def eligible(mod: torch.nn.Module) -> bool:
        return (type(mod) is torch.nn.Linear and mod.weight.dtype in (torch.float16, torch.bfloat16)
                and mod.weight.numel() >= DECODE_GEMV_MIN_ELEMENTS)

    paths = []
    for layer_path in layer_paths:
        layer = ctx.module(layer_path)
        paths += [_join(layer_path, n) for n, m in layer.named_modules() if n and eligible(m)]
    if head and isinstance(_sub(ctx.model, head), torch.nn.Linear) and eligible(_sub(ctx.model, head)):
        paths.append(head)
    for path in paths:
        old = ctx.module(path)
        new = DecodeLinear.from_linear(old, backend=backend, max_m=DECODE_GEMV_MAX_ROWS)
        if old.weight.is_contiguous():
            new.weight = old.weight  # the same Parameter: tied embeddings stay tied through .to(device)
        _set(ctx.model, path, new)
    return len(paths)
