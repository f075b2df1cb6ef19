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
touched. Head counts come from ``ctx.notes["tensor_parallel"]["heads"][layer_path]`` when tensor
parallelism ran first, else from the model config.

Example:
    >>> import torch
    >>> from policyinject.presets import tiny_model
    >>> from policyinject.passes.base import PassContext, MatchedLayer
    >>> from policyinject_plugins.llama import LLAMA_LAYER, LLAMA_CAUSAL_LM
    >>> model = tiny_model("llama")
    >>> class Cfg: replace_with_kernel_inject = True; kernel_backend = "torch"
    >>> layers = [MatchedLayer(f"model.layers.{i}", l, LLAMA_LAYER) for i, l in enumerate(model.model.layers)]
    >>> ctx = PassContext(model=model, config=Cfg(), layers=layers, model_policy=LLAMA_CAUSAL_LM,
    ...                   model_config=model.config)
    >>> p = KernelInjectPass()
    >>> actions = p.plan(ctx)
    >>> [(a.path, a.details["replace"]) for a in actions]
    [('model.layers.0', 'InjectedBlock'), ('model.layers.1', 'InjectedBlock'), ('model.norm', 'FusedRMSNorm')]
    >>> p.apply(ctx, actions)
    >>> type(model.model.layers[0]).__name__
    'InjectedBlock'
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from ..errors import PlanError, PolicyError
from ..plan import Action
from ..policy.model import BlockKind, NormKind, QKVLayout, read_size
from .base import Pass, PassContext

#: HF activation module classes -> the policy's activation names.
_ACTIVATIONS = {
    "SiLUActivation": "silu", "SiLU": "silu",
    "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "GELUActivation": "gelu", "ReLU": "relu", "ReLUSquaredActivation": "relu2",
}
#: Activation classes the injected MLP cannot reproduce.
_UNSUPPORTED_ACTIVATIONS = {
    "QuickGELUActivation", "ClippedGELUActivation", "AccurateGELUActivation",
    "MishActivation", "LaplaceActivation", "LinearActivation", "XIELUActivation", "ReLU6", "LeakyReLU",
}
#: Mask formats the injected attention consumes (4-D bool or additive masks, or None).
_ATTN_IMPLEMENTATIONS = (None, "sdpa", "eager")


@attrs.frozen
class _LayerPlan:
    mode: str  # "block" or "submodules"
    policy: Any
    heads: int
    kv_heads: int
    head_dim: int
    backend: str
    kind: Optional[BlockKind] = None
    #: submodule mode: layer-relative path -> what replaces it ("attention", "mlp", "norm:<index>")
    replace: tuple = ()


def _norm_class(kind: Any) -> str:
    return "FusedRMSNorm" if NormKind(kind) is NormKind.RMS else "FusedLayerNorm"


def _sub(root: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _covered(name: str, prefixes: set) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes if p)


def _param_owners(module: torch.nn.Module) -> list:
    """Layer-relative names of submodules that hold parameters directly."""
    return [n for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]


class KernelInjectPass(Pass):
    """Fused-kernel injection; see the module docstring."""

    name = "kernel_inject"

    def enabled(self, config: Any) -> bool:
        return bool(getattr(config, "replace_with_kernel_inject", False))

    # ---------------------------------------------------------------------------------------------- plan
    def plan(self, ctx: PassContext) -> list:
        backend = str(getattr(ctx.config, "kernel_backend", "auto") or "auto")
        problems: list = []
        actions: list = []
        impl = getattr(ctx.model_config, "_attn_implementation", None)
        if impl not in _ATTN_IMPLEMENTATIONS and ctx.layers:
            problems.append(
                f"the model uses attn_implementation={impl!r}, whose masks the injected attention cannot read; "
                f"load it with attn_implementation='sdpa' (or 'eager')")
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
                       "lm_head": head or "-"}, ("decode_gemv", backend, head))

    def _heads(self, ctx: PassContext, path: str, policy: Any, where: str) -> tuple:
        a = policy.attention
        cfg = ctx.model_config
        try:
            heads = read_size(cfg, a.num_heads)
            kv = read_size(cfg, a.num_kv_heads) or heads
            head_dim = read_size(cfg, a.head_dim)
        except (PolicyError, AttributeError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: reading head counts from the model config failed: {exc}") from None
        if heads is None:
            raise PlanError(f"{where}: the model config gives no head count ({a.num_heads!r})")
        if head_dim is None:
            hidden = read_size(cfg, ("hidden_size", "n_embd", "d_model"))
            if hidden is None or hidden % heads:
                raise PlanError(f"{where}: cannot derive head_dim (hidden size {hidden}, {heads} heads)")
            head_dim = hidden // heads
        local = ctx.notes.get("tensor_parallel", {}).get("heads", {}).get(path)
        if local:
            heads, kv = int(local["heads"]), int(local.get("kv_heads", kv))
        return heads, kv, head_dim

    def _plan_layer(self, ctx: PassContext, matched: Any, backend: str) -> Optional[Action]:
        from ..modules.fused_linear import in_features, is_conv1d, out_features

        policy, layer, path = matched.policy, matched.module, matched.path
        cls = type(layer).__name__
        where = f"{path} ({cls}, policy from {policy.source or 'user'})"
        a, m = policy.attention, policy.mlp
        if a is None:
            return Action(self.name, path, cls, "keep", {"reason": "the policy describes no attention role"})
        problems: list = []

        def need(prefix: str, name: Optional[str], role: str) -> Optional[torch.nn.Module]:
            if name is None:
                return None
            full = _join(prefix, name)
            mod = _sub(layer, full)
            if mod is None:
                problems.append(f"{where}: the policy names {role} {full!r}, but the layer has no such submodule")
            return mod

        attn_root = need("", a.module, "attention module") if a.module else layer
        heads, kv, d = self._heads(ctx, path, policy, where)
        # Tensor parallelism plans before us and applies before us: check this rank's local shapes.
        local_shapes = ctx.notes.get("tensor_parallel", {}).get("local_shapes", {})

        def out_f(rel: str, mod: torch.nn.Module) -> int:
            shape = local_shapes.get(_join(path, rel))
            return int(shape[0]) if shape else out_features(mod)

        def in_f(rel: str, mod: torch.nn.Module) -> int:
            shape = local_shapes.get(_join(path, rel))
            return int(shape[1]) if shape else in_features(mod)

        if heads % kv:
            problems.append(f"{where}: {heads} query heads do not group evenly over {kv} kv heads")
        fused_names: list = []
        if attn_root is not None:
            if a.qkv is not None:
                qkv = need(a.module, a.qkv, "fused qkv projection")
                if qkv is not None and out_f(a.path(a.qkv), qkv) != (heads + 2 * kv) * d:
                    problems.append(f"{where}: {a.path(a.qkv)} has {out_f(a.path(a.qkv), qkv)} output features, expected "
                                    f"(heads {heads} + 2 x kv heads {kv}) x head_dim {d} = {(heads + 2 * kv) * d}")
                if QKVLayout(a.qkv_layout) is QKVLayout.PER_HEAD and heads != kv:
                    problems.append(f"{where}: the per_head qkv layout needs as many kv heads as heads ({heads} vs {kv})")
                fused_names = [a.qkv]
            else:
                for name, want in ((a.q, heads * d), (a.k, kv * d), (a.v, kv * d)):
                    mod = need(a.module, name, "projection")
                    if mod is not None and out_f(a.path(name), mod) != want:
                        problems.append(f"{where}: {a.path(name)} has {out_f(a.path(name), mod)} output features, expected "
                                        f"{want} ({heads} heads, {kv} kv heads, head_dim {d})")
                fused_names = [a.q, a.k, a.v]
                mods = [_sub(layer, a.path(n)) for n in fused_names]
                problems.extend(self._fusable(where, [a.path(n) for n in fused_names], mods))
            o = need(a.module, a.o, "output projection")
            if a.o is None:
                problems.append(f"{where}: the attention role names no output projection (o)")
            elif o is not None and in_f(a.path(a.o), o) != heads * d:
                problems.append(f"{where}: {a.path(a.o)} takes {in_f(a.path(a.o), o)} input features, expected {heads * d}")
            need(a.module, a.q_norm, "q norm")
            need(a.module, a.k_norm, "k norm")
        mlp_names: list = []
        if m is not None:
            if m.module:
                need("", m.module, "MLP module")
            if m.gated:
                if m.gate_up is not None:
                    need(m.module, m.gate_up, "gate_up projection")
                    mlp_names = [m.gate_up]
                else:
                    g, u = need(m.module, m.gate, "gate projection"), need(m.module, m.up, "up projection")
                    mlp_names = [m.gate, m.up]
                    if g is not None and u is not None:
                        problems.extend(self._fusable(where, [m.path(m.gate), m.path(m.up)], [g, u]))
                need(m.module, m.down, "down projection")
            else:
                need(m.module, m.fc1, "fc1")
                need(m.module, m.fc2, "fc2")
            mlp_root = _sub(layer, m.module)
            if mlp_root is not None:
                problems.extend(self._check_activation(where, mlp_root, m, exclude=a.module if not m.module else None))
        for spec in policy.norms:
            mod = need("", spec.path, "norm")
            if (mod is not None and spec.eps is None
                    and not any(isinstance(getattr(mod, e, None), (int, float)) for e in spec.eps_attr)):
                problems.append(f"{where}: norm {spec.path!r} has none of the epsilon attributes {list(spec.eps_attr)}")
        if problems:
            raise PlanError(problems)

        from ..modules.block import effective_block_kind

        kind = effective_block_kind(policy, layer)
        owners = _param_owners(layer)
        roles = self._role_paths(policy)
        uncovered = [n for n in owners if not _covered(n, roles)]
        transposed = [p for p in policy.transposed if is_conv1d(_sub(layer, p) or torch.nn.Identity())]
        details: dict = {"heads": heads, "kv_heads": kv, "head_dim": d, "backend": backend}
        if a.qkv is None:
            details["fused"] = fused_names
        else:
            details["qkv"] = f"{a.qkv} ({QKVLayout(a.qkv_layout).value})"
        if mlp_names and m is not None and m.gate_up is None and m.gated:
            details["fused_mlp"] = mlp_names
        if transposed:
            details["transposed"] = transposed
        sandwich = policy.attention_output_norm is not None and policy.mlp_output_norm is not None
        block_ok = (kind is not BlockKind.OPAQUE and m is not None and (policy.input_norm is not None or sandwich)
                    and (kind is BlockKind.PARALLEL or policy.post_attention_norm is not None or sandwich))
        if block_ok and not uncovered:
            details = {"replace": "InjectedBlock", "kind": kind.value, **details}
            payload = _LayerPlan("block", policy, heads, kv, d, backend, kind)
            return Action(self.name, path, cls, "replace", details, payload)

        replace: list = []
        kept: list = []
        attn_direct = a.module and all("." not in n for n in (a.q, a.k, a.v, a.qkv, a.o) if n is not None)
        if attn_direct and not self._uncovered_under(a.module, uncovered):
            replace.append((a.module, "attention"))
        else:
            kept.append(a.module or "(attention)")
        if m is not None and m.module:
            if self._uncovered_under(m.module, uncovered):
                kept.append(m.module)
            else:
                replace.append((m.module, "mlp"))
        for i, spec in enumerate(policy.norms):
            replace.append((spec.path, f"norm:{i}"))
        if not replace:
            return Action(self.name, path, cls, "keep", {"reason": "nothing this policy describes can be replaced"})
        names = {"attention": "InjectedAttention", "mlp": "InjectedMLP"}
        details = {
            "replace": {p: names.get(what) or _norm_class(policy.norms[int(what[5:])].kind) for p, what in replace},
            **details,
        }
        if kind is BlockKind.OPAQUE:
            details["reason"] = "opaque block: the layer's own forward is kept"
        elif uncovered:
            details["reason"] = f"parameters outside the policy's roles: {uncovered[:4]}"
        if kept:
            details["kept"] = kept
        payload = _LayerPlan("submodules", policy, heads, kv, d, backend, kind, tuple(replace))
        return Action(self.name, path, cls, "replace_submodules", details, payload)

    @staticmethod
    def _uncovered_under(prefix: str, uncovered: list) -> list:
        """Parameter-holding submodules under ``prefix`` that no role names (replacing would drop them)."""
        return [n for n in uncovered if n == prefix or n.startswith(prefix + ".")]

    @staticmethod
    def _role_paths(policy: Any) -> set:
        a, m = policy.attention, policy.mlp
        out = {n.path for n in policy.norms}
        if a is not None:
            out |= {a.path(n) for n in (a.q, a.k, a.v, a.qkv, a.o, a.q_norm, a.k_norm) if n is not None}
        if m is not None:
            out |= {m.path(n) for n in (m.gate, m.up, m.gate_up, m.down, m.fc1, m.fc2) if n is not None}
        return out

    @staticmethod
    def _fusable(where: str, paths: list, mods: list) -> list:
        from ..modules.fused_linear import is_conv1d

        present = [x for x in mods if x is not None]
        if len(present) < len(mods):
            return []
        if all(isinstance(x, torch.nn.Linear) or is_conv1d(x) for x in present):
            return []
        kinds = {type(x) for x in present}
        if len(kinds) == 1 and callable(getattr(next(iter(kinds)), "cat", None)):
            return []
        names = ", ".join(f"{p} ({type(x).__name__})" for p, x in zip(paths, present))
        return [f"{where}: cannot fuse {names}: they are not nn.Linear/Conv1D and their class has no `cat`"]

    @staticmethod
    def _check_activation(where: str, root: torch.nn.Module, spec: Any, exclude: Optional[str]) -> list:
        found = set()
        for name, mod in root.named_modules():
            if exclude and (name == exclude or name.startswith(exclude + ".")):
                continue
            cname = type(mod).__name__
            if cname in _UNSUPPORTED_ACTIVATIONS:
                return [f"{where}: MLP activation {cname} at {name!r} is not supported by the injected MLP"]
            if cname == "GELU":
                found.add("gelu_tanh" if getattr(mod, "approximate", "none") == "tanh" else "gelu")
            elif cname in _ACTIVATIONS:
                found.add(_ACTIVATIONS[cname])
        want = getattr(spec.activation, "value", spec.activation)
        if len(found) == 1 and want not in found:
            return [f"{where}: the policy says activation {want!r} but the layer's MLP uses {found.pop()!r}"]
        return []

    def _plan_final_norm(self, ctx: PassContext, backend: str) -> Optional[Action]:
        mp = ctx.model_policy
        if mp is None or mp.final_norm is None or not ctx.layers:
            return None
        module = _sub(ctx.model, mp.final_norm.path)
        if module is None or not any(True for _ in module.parameters()):
            return None  # e.g. OPT-350m has no final norm
        return Action(self.name, mp.final_norm.path, type(module).__name__, "replace",
                      {"replace": _norm_class(mp.final_norm.kind), "backend": backend}, ("final_norm", backend))

    # --------------------------------------------------------------------------------------------- apply
    def apply(self, ctx: PassContext, actions: list) -> None:
        from ..modules.attention import InjectedAttention
        from ..modules.block import InjectedBlock, norm_from_spec
        from ..modules.mlp import InjectedMLP

        notes = ctx.notes.setdefault("kernel_inject", {"blocks": {}, "submodules": {}})
        for action in actions:
            plan = action.payload
            if plan is None:
                continue
            if isinstance(plan, tuple) and plan[0] == "decode_gemv":
                _use_decode_gemv(ctx, [a.path for a in actions if isinstance(a.payload, _LayerPlan)], *plan[1:])
                continue
            if isinstance(plan, tuple) and plan[0] == "final_norm":
                _set(ctx.model, action.path, norm_from_spec(ctx.model, ctx.model_policy.final_norm, plan[1]))
                continue
            layer = ctx.module(action.path)
            policy = plan.policy
            counts = dict(num_heads=plan.heads, num_kv_heads=plan.kv_heads, head_dim=plan.head_dim)
            if plan.mode == "block":
                block = InjectedBlock.build(layer, policy, backend=plan.backend, model_config=ctx.model_config,
                                            **counts)
                _set(ctx.model, action.path, block)
                notes["blocks"][action.path] = {"heads": plan.heads, "kv_heads": plan.kv_heads,
                                                "head_dim": plan.head_dim, "kind": plan.kind.value}
                continue
            offset = policy.norms[0].weight_offset if policy.norms else 0.0
            for sub, what in plan.replace:
                if what == "attention":
                    a = policy.attention
                    new = InjectedAttention.build(layer.get_submodule(sub), a, backend=plan.backend,
                                                  norm_offset=offset, model_config=ctx.model_config, **counts)
                elif what == "mlp":
                    new = InjectedMLP.build(layer.get_submodule(sub), policy.mlp, plan.backend)
                else:
                    new = norm_from_spec(layer, policy.norms[int(what[5:])], plan.backend)
                _set(layer, sub, new)
            notes["submodules"][action.path] = [sub for sub, _ in plan.replace]
        self._install_decoder(ctx)

    @staticmethod
    def _install_decoder(ctx: PassContext) -> None:
        """Let ``engine.generate`` use the decode engine (static KV cache, eager steps) on injected models.

        Models the decode engine cannot run fall back to the model's own ``generate``; the ``cuda_graph``
        pass replaces this factory with the graphed one. Under tensor parallelism the model's own
        ``generate`` stays in charge.
        """
        tp = getattr(getattr(ctx.config, "tensor_parallel", None), "tp_size", 1)
        if tp != 1:
            return
        from ..decode.generate import make_decoder_factory

        ctx.notes.setdefault("decoder_factory", make_decoder_factory(ctx, use_graphs=False, when_unsupported="none"))


#: Rows up to which ``DecodeLinear`` runs the GEMV kernel (batch-1 decode), and the smallest weight it takes.
DECODE_GEMV_MAX_ROWS = 1
DECODE_GEMV_MIN_ELEMENTS = 1 << 20


def _use_decode_gemv(ctx: PassContext, layer_paths: list, backend: str, head: Optional[str]) -> None:
    """Swap plain 16-bit ``nn.Linear``s of the injected layers (and the head) for ``DecodeLinear``."""
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
    ctx.notes.setdefault("kernel_inject", {})["decode_gemv_linears"] = len(paths)


def _set(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
