"""Which linears the quantize pass quantizes: the plan-side selection, for known and unknown models alike.

Every linear-like module of the model (``nn.Linear`` and subclasses, Hugging Face ``Conv1D``, modules marked
``_policyinject_linear``) gets exactly one verdict, in model order:

1. **Default selection.** Inside a layer a policy covers, the policy decides: the linears it names are
   selected (the q/k/v projections only with ``quant.qkv.enabled``), others are skipped. Outside the covered
   layers: when *no* layer of the model is covered (a model no policy knows), every linear is selected, as
   torchao's ``quantize_`` does; otherwise they are skipped (a known model's policies say what is worth
   quantizing).
2. ``quant.weight.include`` (patterns, :mod:`policyinject.config.patterns`) replaces the default selection:
   exactly the linears whose path matches a pattern, wherever they are (``quant.qkv.enabled`` then does not
   apply: the patterns say which projections).
3. The **output head** -- the model policy's ``lm_head``, the model's ``get_output_embeddings()``, any
   linear whose weight is an embedding's (tied), or, in a model no policy covers and none of these, its last
   linear -- is quantized exactly when ``quant.lm_head.enabled`` (include patterns do not select it).
4. ``quant.weight.exclude`` removes the linears whose path matches, the head included.

Each skipped linear comes with its reason (:attr:`Selection.skipped`); a skip the user asked for by name
(``exclude``, ``quant.qkv.enabled``) also becomes a ``keep`` action of the plan.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> sel = select_linears(model, [], None, lm_head=False, qkv=True, include=None, exclude=None)
    >>> [c.path for c in sel.selected], sel.skipped
    (['0'], {'2': "the output head (the model's last linear), kept unless quant.lm_head.enabled"})
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn

from .._nn import is_conv1d
from ..config.patterns import first_match
from ..errors import PlanError
from ..policy.model import is_linear_like

__all__ = ["Candidate", "Selection", "select_linears", "output_heads", "float_expert_weights"]


@attrs.frozen
class Candidate:
    """One selected linear: its model path and how its weight is laid out."""

    path: str
    module: nn.Module = attrs.field(repr=False, eq=False)
    #: ``[in, out]`` weight (``Conv1D``, or a policy's ``transposed`` entry).
    transposed: bool = False
    #: The layer-relative path inside its covered layer (None outside the covered layers).
    rel: Optional[str] = None


@attrs.define
class Selection:
    selected: List[Candidate] = attrs.field(factory=list)
    #: Path -> why it is not quantized.
    skipped: Dict[str, str] = attrs.field(factory=dict)
    #: Skips the user asked for by name (exclude patterns, ``quant.qkv.enabled``): path -> reason.
    requested_skips: Dict[str, str] = attrs.field(factory=dict)
    #: ``quant.weight.exclude`` patterns that matched no linear.
    unused_excludes: Tuple[str, ...] = ()


def _is_candidate(module: nn.Module) -> bool:
    from ..modules.quant_linear import QuantLinear

    if isinstance(module, QuantLinear):
        return True
    w = getattr(module, "weight", None)
    return is_linear_like(module) and isinstance(w, torch.Tensor) and w.dim() == 2


def output_heads(model: nn.Module, model_policy: Any, covered: bool) -> Dict[str, str]:
    """The output head(s) of ``model``: path -> how it was recognised (see the module docstring, step 4).

    Example:
        >>> output_heads(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)), None, covered=False)
        {'1': "the model's last linear"}
    """
    modules = dict(model.named_modules())
    ids = {id(m): n for n, m in modules.items()}
    heads: Dict[str, str] = {}
    head = getattr(model_policy, "lm_head", None) if model_policy is not None else None
    if head and head in modules:
        heads[head] = "the model policy's lm_head"
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # noqa: BLE001 - a model without output embeddings may raise anything here
            out = None
        if isinstance(out, nn.Module) and id(out) in ids and ids[id(out)]:
            heads.setdefault(ids[id(out)], "the model's output embeddings")
    embeddings = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    for name, mod in modules.items():
        if name and _is_candidate(mod) and id(getattr(mod, "weight", None)) in embeddings:
            heads.setdefault(name, "tied to an input embedding")
    if not heads and not covered:
        last = [n for n, m in modules.items() if n and _is_candidate(m)]
        if last:
            heads[last[-1]] = "the model's last linear"
    return heads


def select_linears(model: nn.Module, layers: Sequence[Any], model_policy: Any, *, lm_head: bool, qkv: bool,
                   include: Optional[Tuple[str, ...]], exclude: Optional[Tuple[str, ...]],
                   head_by_policy: bool = False) -> Selection:
    """The verdict on every linear of ``model`` (see the module docstring).

    ``layers``: the resolved layers (``path``, ``module``, ``policy``). ``head_by_policy``: the model policy's
    head is planned separately (``quant.lm_head.enabled`` with a model policy) and left out here.
    Raises :class:`PlanError` when an include pattern matches no linear.
    """
    from ..modules.quant_linear import QuantLinear

    named = [(n, m) for n, m in model.named_modules() if n and _is_candidate(m)]
    owner: Dict[str, Tuple[Any, str]] = {}  # path -> (resolved layer, layer-relative path)
    policy_linears: Dict[str, Tuple[bool, bool]] = {}  # path -> (transposed, is qkv)
    for layer in layers:
        prefix = f"{layer.path}." if layer.path else ""
        for rel, mod in layer.module.named_modules():
            if rel and _is_candidate(mod):
                owner.setdefault(prefix + rel, (layer, rel))
        styles = layer.policy.styles_for(layer.module)[0]
        a = getattr(layer.policy, "attention", None)
        qkv_rel = {a.path(n) for n in (a.q, a.k, a.v, a.qkv) if n is not None} if a is not None else set()
        transposed = set(layer.policy.transposed)
        for rel in styles:
            policy_linears.setdefault(prefix + rel, (rel in transposed, rel in qkv_rel))
    covered = bool(layers)
    heads = output_heads(model, model_policy, covered)
    policy_head = getattr(model_policy, "lm_head", None) if model_policy is not None else None
    out = Selection()
    seen: set = set()
    include_hits = {p for p in include or () if any(first_match((p,), n) for n, _ in named)}
    for path, mod in named:
        if id(mod) in seen:
            out.skipped[path] = "the same module as another path (quantized once)"
            continue
        seen.add(id(mod))
        layer_rel = owner.get(path)
        transposed, is_qkv = policy_linears.get(path, (False, False))
        transposed = transposed or is_conv1d(mod)
        if path in heads:
            chosen = lm_head
            reason = f"the output head ({heads[path]}), kept unless quant.lm_head.enabled"
        elif include is not None:
            chosen, reason = first_match(include, path) is not None, "matches no quant.weight.include pattern"
        elif layer_rel is not None:
            chosen = path in policy_linears
            reason = f"the policy for {type(layer_rel[0].module).__name__} does not name it"
        elif covered:
            chosen, reason = False, "outside the layers the policies cover (quant.weight.include selects it)"
        else:
            chosen, reason = True, ""
        if chosen:
            ex = first_match(exclude, path)
            if ex is not None:
                chosen, reason = False, f"matches quant.weight.exclude pattern {ex!r}"
                out.requested_skips[path] = reason
            elif is_qkv and not qkv and include is None:
                chosen, reason = False, "quant.qkv.enabled is false"
                out.requested_skips[path] = reason
            elif isinstance(mod, QuantLinear):
                chosen, reason = False, "already quantized"
                out.requested_skips[path] = reason
        if chosen and head_by_policy and path == policy_head:
            continue  # the quantize pass plans the model policy's head itself (tied-head accounting)
        if chosen:
            out.selected.append(Candidate(path, mod, transposed, layer_rel[1] if layer_rel else None))
        else:
            out.skipped[path] = reason
    missing = [p for p in include or () if p not in include_hits]
    if missing:
        names = [p for p, _ in named][:8]
        raise PlanError(f"quant.weight.include: {', '.join(repr(p) for p in missing)} match no linear of "
                        f"{type(model).__name__} (its linears: {', '.join(names)}{', ...' if len(named) > 8 else ''})")
    out.unused_excludes = tuple(p for p in exclude or () if not any(first_match((p,), n) for n, _ in named))
    return out


def float_expert_weights(model: nn.Module, layers: Sequence[Any], moe_injected: bool) -> Dict[str, str]:
    """Routed-expert weights the weight quantization cannot reach: module path -> ``Class (parameters)``.

    A module counts when its class name or its path names an expert and it holds floating-point parameters of
    three or more dimensions (``[experts, out, in]``, as Hugging Face's fused expert modules do): these are no
    ``nn.Linear``. Modules inside a layer whose policy describes its MoE block are left out when
    ``moe_injected`` (kernel injection with ``moe.enabled``: the injected block quantizes its experts).

    Example:
        >>> class MixtralExperts(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 8, 2))
        >>> float_expert_weights(torch.nn.Sequential(MixtralExperts()), [], moe_injected=False)
        {'0': 'MixtralExperts (gate_up_proj)'}
    """
    covered = []
    if moe_injected:
        for layer in layers:
            spec = layer.policy.moe_for(layer.module)
            if spec is not None:
                prefix = ".".join(p for p in (layer.path, spec.module) if p)
                covered.append(prefix)
    out: Dict[str, str] = {}
    for path, mod in model.named_modules():
        if not path or "expert" not in f"{type(mod).__name__}.{path}".lower():
            continue
        names = [n for n, p in mod.named_parameters(recurse=False) if p.dim() >= 3 and p.is_floating_point()]
        if not names or isinstance(mod, nn.modules.conv._ConvNd):
            continue
        if any(path == c or path.startswith(c + ".") or not c for c in covered):
            continue
        out[path] = f"{type(mod).__name__} ({', '.join(names)})"
    return out
