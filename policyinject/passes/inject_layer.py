"""Kernel injection, one layer: check a layer against its policy, then choose block- or submodule-level.

:func:`plan_layer` runs the checks (role paths exist, projection shapes match the head counts -- this rank's
local shapes under tensor parallelism --, the projections to fuse can be fused, the MLP activation and the
norms' epsilon attributes match), each a small function appending to one problem list, and raises one
:class:`~policyinject.errors.PlanError` listing them all. A layer whose policy describes every parameter and a
known wiring becomes an ``InjectedBlock``; otherwise its attention, MLP and norms are replaced one by one.

Example:
    >>> from policyinject.testing.presets import tiny_model
    >>> from policyinject_plugins.llama import LLAMA_LAYER
    >>> model = tiny_model("llama")
    >>> layer = model.model.layers[0]
    >>> action = plan_layer("model.layers.0", layer, LLAMA_LAYER, (4, 2, 16), "torch", None)
    >>> action.action, action.details["replace"], action.payload.kv_heads
    ('replace', 'InjectedBlock', 2)
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import attrs
import torch

from .._nn import in_features, is_conv1d, join_path, out_features, submodule_or_none
from ..errors import PlanError
from ..plan import Action
from ..policy.model import BlockKind, NormKind, QKVLayout

__all__ = ["LayerInjection", "plan_layer", "norm_class"]

NAME = "kernel_inject"

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


@attrs.frozen
class LayerInjection:
    """Payload of a layer's ``replace`` / ``replace_submodules`` action."""

    mode: str  # "block" or "submodules"
    policy: Any
    heads: int
    kv_heads: int
    head_dim: int
    backend: str
    kind: Optional[BlockKind] = None
    #: submodule mode: layer-relative path -> what replaces it ("attention", "mlp", "moe", "norm:<index>")
    replace: tuple = ()
    #: The layer's MoE block plan (:class:`~policyinject.passes.moe_inject.MoEBuild`), None for a dense layer.
    moe: Any = None


def norm_class(kind: Any) -> str:
    return "FusedRMSNorm" if NormKind(kind) is NormKind.RMS else "FusedLayerNorm"


@attrs.define
class _Checker:
    """Collects the problems of one layer; looks up role paths and this rank's linear shapes."""

    path: str
    layer: torch.nn.Module
    where: str
    layout: Any  # Optional[TensorParallelLayout]
    problems: List[str] = attrs.field(factory=list)

    def need(self, prefix: str, name: Optional[str], role: str) -> Optional[torch.nn.Module]:
        if name is None:
            return None
        full = join_path(prefix, name)
        mod = submodule_or_none(self.layer, full)
        if mod is None:
            self.problems.append(f"{self.where}: the policy names {role} {full!r}, but the layer has no such submodule")
        return mod

    def shape(self, rel: str, mod: torch.nn.Module) -> Tuple[int, int]:
        """This rank's (out, in) of the linear at layer-relative ``rel`` (tensor parallelism applies first)."""
        full = (out_features(mod), in_features(mod))
        return self.layout.local_shape(join_path(self.path, rel), full) if self.layout is not None else full


def _check_attention(chk: _Checker, a: Any, heads: int, kv: int, d: int) -> List[str]:
    """Attention roles against the head geometry; the projections fused into one (their names)."""
    if heads % kv:
        chk.problems.append(f"{chk.where}: {heads} query heads do not group evenly over {kv} kv heads")
    attn_root = chk.need("", a.module, "attention module") if a.module else chk.layer
    if attn_root is None:
        return []
    if a.qkv is not None:
        qkv = chk.need(a.module, a.qkv, "fused qkv projection")
        rel = a.path(a.qkv)
        if qkv is not None and chk.shape(rel, qkv)[0] != (heads + 2 * kv) * d:
            chk.problems.append(f"{chk.where}: {rel} has {chk.shape(rel, qkv)[0]} output features, expected "
                                f"(heads {heads} + 2 x kv heads {kv}) x head_dim {d} = {(heads + 2 * kv) * d}")
        if QKVLayout(a.qkv_layout) is QKVLayout.PER_HEAD and heads != kv:
            chk.problems.append(f"{chk.where}: the per_head qkv layout needs as many kv heads as heads ({heads} vs {kv})")
        fused = [a.qkv]
    else:
        for name, want in ((a.q, heads * d), (a.k, kv * d), (a.v, kv * d)):
            mod = chk.need(a.module, name, "projection")
            if mod is not None and chk.shape(a.path(name), mod)[0] != want:
                chk.problems.append(f"{chk.where}: {a.path(name)} has {chk.shape(a.path(name), mod)[0]} output "
                                    f"features, expected {want} ({heads} heads, {kv} kv heads, head_dim {d})")
        fused = [a.q, a.k, a.v]
        mods = [submodule_or_none(chk.layer, a.path(n)) for n in fused]
        chk.problems.extend(_fusable(chk.where, [a.path(n) for n in fused], mods))
    o = chk.need(a.module, a.o, "output projection")
    if a.o is None:
        chk.problems.append(f"{chk.where}: the attention role names no output projection (o)")
    elif o is not None and chk.shape(a.path(a.o), o)[1] != heads * d:
        chk.problems.append(f"{chk.where}: {a.path(a.o)} takes {chk.shape(a.path(a.o), o)[1]} input features, "
                            f"expected {heads * d}")
    chk.need(a.module, a.q_norm, "q norm")
    chk.need(a.module, a.k_norm, "k norm")
    return fused


def _check_mlp(chk: _Checker, m: Any, attention_module: str) -> List[str]:
    """MLP roles and activation; the projections fused into one (their names)."""
    if m is None:
        return []
    if m.module:
        chk.need("", m.module, "MLP module")
    names: List[str] = []
    if m.gated:
        if m.gate_up is not None:
            chk.need(m.module, m.gate_up, "gate_up projection")
            names = [m.gate_up]
        else:
            g, u = chk.need(m.module, m.gate, "gate projection"), chk.need(m.module, m.up, "up projection")
            names = [m.gate, m.up]
            if g is not None and u is not None:
                chk.problems.extend(_fusable(chk.where, [m.path(m.gate), m.path(m.up)], [g, u]))
        chk.need(m.module, m.down, "down projection")
    else:
        chk.need(m.module, m.fc1, "fc1")
        chk.need(m.module, m.fc2, "fc2")
    root = submodule_or_none(chk.layer, m.module)
    if root is not None:
        chk.problems.extend(_check_activation(chk.where, root, m, exclude=attention_module if not m.module else None))
    return names


def _check_norms(chk: _Checker, policy: Any) -> None:
    for spec in policy.norms:
        mod = chk.need("", spec.path, "norm")
        if (mod is not None and spec.eps is None
                and not any(isinstance(getattr(mod, e, None), (int, float)) for e in spec.eps_attr)):
            chk.problems.append(f"{chk.where}: norm {spec.path!r} has none of the epsilon attributes "
                                f"{list(spec.eps_attr)}")


def _fusable(where: str, paths: list, mods: list) -> list:
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


def _role_paths(policy: Any, moe: Any = None) -> set:
    a, m = policy.attention, policy.mlp
    out = {n.path for n in policy.norms}
    if moe is not None:  # the MoE block takes the MLP slot
        m = None
        out.add(moe.module)
    if a is not None:
        out |= {a.path(n) for n in (a.q, a.k, a.v, a.qkv, a.o, a.q_norm, a.k_norm) if n is not None}
    if m is not None:
        out |= {m.path(n) for n in (m.gate, m.up, m.gate_up, m.down, m.fc1, m.fc2) if n is not None}
    return out


def _under(prefix: str, names: Sequence[str]) -> list:
    """``names`` at or under ``prefix``."""
    return [n for n in names if n == prefix or n.startswith(prefix + ".")]


def _uncovered_parameters(layer: torch.nn.Module, policy: Any, moe: Any = None) -> list:
    """Layer-relative names of parameter-holding submodules that no role of the policy names."""
    roles = _role_paths(policy, moe)
    owners = [n for n, m in layer.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return [n for n in owners if not any(n == p or n.startswith(p + ".") for p in roles if p)]


def _common_details(policy: Any, layer: torch.nn.Module, heads: Tuple[int, int, int], backend: str,
                    fused: List[str], mlp_names: List[str]) -> dict:
    a, m = policy.attention, policy.mlp
    details: dict = {"heads": heads[0], "kv_heads": heads[1], "head_dim": heads[2], "backend": backend}
    if a.qkv is None:
        details["fused"] = fused
    else:
        details["qkv"] = f"{a.qkv} ({QKVLayout(a.qkv_layout).value})"
    if mlp_names and m is not None and m.gate_up is None and m.gated:
        details["fused_mlp"] = mlp_names
    transposed = [p for p in policy.transposed if is_conv1d(submodule_or_none(layer, p) or torch.nn.Identity())]
    if transposed:
        details["transposed"] = transposed
    return details


def _submodule_action(path: str, cls: str, policy: Any, heads: Tuple[int, int, int], backend: str, kind: BlockKind,
                      uncovered: list, details: dict, moe: Any = None) -> Action:
    """Submodule-level injection: the attention (q/k/v/o direct children), the named MLP or MoE, each norm."""
    a, m = policy.attention, policy.mlp
    if moe is not None:
        m = None
    replace: list = []
    kept: list = []
    attn_direct = a.module and all("." not in n for n in (a.q, a.k, a.v, a.qkv, a.o) if n is not None)
    if attn_direct and not _under(a.module, uncovered):
        replace.append((a.module, "attention"))
    else:
        kept.append(a.module or "(attention)")
    if m is not None and m.module:
        if _under(m.module, uncovered):
            kept.append(m.module)
        else:
            replace.append((m.module, "mlp"))
    if moe is not None:
        replace.append((moe.spec.module, "moe"))
    for i, spec in enumerate(policy.norms):
        replace.append((spec.path, f"norm:{i}"))
    if not replace:
        return Action(NAME, path, cls, "keep", {"reason": "nothing this policy describes can be replaced"})
    names = {"attention": "InjectedAttention", "mlp": "InjectedMLP", "moe": moe.module_class if moe else ""}
    details = {"replace": {p: names.get(what) or norm_class(policy.norms[int(what[5:])].kind) for p, what in replace},
               **details}
    if kind is BlockKind.OPAQUE:
        details["reason"] = "opaque block: the layer's own forward is kept"
    elif uncovered:
        details["reason"] = f"parameters outside the policy's roles: {uncovered[:4]}"
    if kept:
        details["kept"] = kept
    payload = LayerInjection("submodules", policy, *heads, backend, kind, tuple(replace), moe)
    return Action(NAME, path, cls, "replace_submodules", details, payload)


def plan_layer(path: str, layer: torch.nn.Module, policy: Any, heads: Tuple[int, int, int], backend: str,
               layout: Any, source: str = "", moe: Any = None) -> Action:
    """The injection action of one layer (``heads``: this rank's heads, kv heads, head_dim; ``moe``: the
    plan of the layer's MoE block, which then takes the MLP slot)."""
    cls = type(layer).__name__
    a, m = policy.attention, policy.mlp
    if moe is not None:
        m = None
    if a is None:
        return Action(NAME, path, cls, "keep", {"reason": "the policy describes no attention role"})
    chk = _Checker(path, layer, f"{path} ({cls}, policy from {policy.source or 'user'})", layout)
    fused = _check_attention(chk, a, *heads)
    mlp_names = _check_mlp(chk, m, a.module)
    _check_norms(chk, policy)
    if chk.problems:
        raise PlanError(chk.problems)
    from ..modules.block import effective_block_kind

    kind = effective_block_kind(policy, layer)
    uncovered = _uncovered_parameters(layer, policy, None if moe is None else moe.spec)
    details = _common_details(policy, layer, heads, backend, fused, mlp_names)
    if moe is not None:
        details["moe"] = moe.describe()
    sandwich = policy.attention_output_norm is not None and policy.mlp_output_norm is not None
    block_ok = (kind is not BlockKind.OPAQUE and (m is not None or moe is not None) and (policy.input_norm is not None or sandwich)
                and (kind is BlockKind.PARALLEL or policy.post_attention_norm is not None or sandwich))
    if block_ok and not uncovered:
        details = {"replace": "InjectedBlock", "kind": kind.value, **details}
        return Action(NAME, path, cls, "replace", details,
                      LayerInjection("block", policy, *heads, backend, kind, moe=moe))
    return _submodule_action(path, cls, policy, heads, backend, kind, uncovered, details, moe)
