"""Match policies to the module instances of a model, and lint what is left uncovered.

Layer policies match by exact class first, then by fully qualified class name; the policies a user passes
through ``injection_policy`` take precedence over plugins for their class. A matched layer's descendants
are not matched again, so a user entry for a class nested inside a matched layer is a
:class:`~policyinject.errors.PolicyError` (key it by the layer class). Nothing here mutates the model.

Example:
    >>> import torch
    >>> from policyinject.policy import Policy
    >>> from policyinject.policy.matching import match_layers
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc = torch.nn.Linear(4, 4)
    >>> model = torch.nn.Sequential(Block(), Block())
    >>> result = match_layers(model, user=[Policy(Block, styles={"fc": "row"})], plugins=[])
    >>> [m.path for m in result.layers]
    ['0', '1']
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import attrs
import torch

from ..errors import PolicyError
from .model import ModelPolicy, Policy
from .._nn import qualname
from .resolved import ResolvedBy, ResolvedLayer


@attrs.define
class MatchResult:
    layers: list = attrs.field(factory=list)
    model_policy: Optional[ModelPolicy] = None
    lint: list = attrs.field(factory=list)


def find_policy(module_class: type, candidates: Sequence[Policy]) -> list:
    """Candidates for one class: exact class matches first, then qualified-name matches.

    Example:
        >>> import torch
        >>> p = Policy("torch.nn.modules.linear.Linear", styles={"x": "row"})
        >>> find_policy(torch.nn.Linear, [p]) == [p]
        True
    """
    exact = [p for p in candidates if not isinstance(p.layer, str) and p.layer is module_class]
    named = [p for p in candidates if isinstance(p.layer, str) and p.layer == qualname(module_class)]
    return exact + named


def match_layers(
    model: torch.nn.Module,
    user: Sequence[Policy],
    plugins: Sequence[Policy],
    model_policies: Sequence[ModelPolicy] = (),
    select: Optional[Callable[[Any, str, list], Optional[Policy]]] = None,
) -> MatchResult:
    """Find every module instance covered by a policy (user policies win over plugin policies)."""
    result = MatchResult()
    covered: list = []  # (path, policy) of every matched layer
    user_hits = {id(p): 0 for p in user}
    nested: list = []  # (user policy, path, covering path, covering policy)
    for path, module in model.named_modules():
        outer = next(((c, cp) for c, cp in covered if path == c or path.startswith(c + ".")), None)
        if outer is not None:
            nested.extend((p, path) + outer for p in find_policy(type(module), user)[:1] if p is not outer[1])
            continue
        cls = type(module)
        chosen = None
        user_candidates = find_policy(cls, user)
        if user_candidates:
            chosen = user_candidates[0]
            user_hits[id(chosen)] += 1
        else:
            candidates = find_policy(cls, plugins)
            if len(candidates) > 1 and select is not None:
                chosen = select(module, path, candidates) or candidates[0]
            elif candidates:
                chosen = candidates[0]
        if chosen is None:
            continue
        by = ResolvedBy.PLUGIN
        if user_candidates:
            by = ResolvedBy.TP_PLAN if chosen.source == "tp_plan" else ResolvedBy.USER
        result.layers.append(ResolvedLayer(path=path, module=module, policy=chosen, resolved_by=by))
        covered.append((path, chosen))
    _refuse_nested(nested)
    for p in user:
        if user_hits[id(p)] == 0:
            result.lint.append(f"injection_policy for {p.layer_name} matched no module in the model")
    result.model_policy = match_model(model, model_policies)
    result.lint.extend(uncovered_layer_classes(model, result.layers))
    return result


def _refuse_nested(nested: Sequence[tuple]) -> None:
    """``PolicyError`` for user entries whose class sits inside a layer another policy covers: a covered
    layer's descendants are not matched again, so the entry would silently do nothing there."""
    seen: set = set()
    problems = []
    for p, path, outer_path, outer in nested:
        if id(p) in seen:
            continue
        seen.add(id(p))
        written = f"injection_policy[{p.layer_name}]" if p.source != "tp_plan" else f"tensor_parallel.tp_plan ({p.layer_name})"
        problems.append(
            f"{written}: {p.layer_name} at {path!r} is inside {outer_path!r}, a {outer.layer_name} that the policy "
            f"of {outer.source or 'a plugin'} covers as one layer, so the entry would not be applied; key the entry "
            f"by the layer class instead ({{{outer.layer_name}: ...}}, paths relative to it), or pass a Policy for "
            f"{outer.layer_name}")
    if problems:
        raise PolicyError("\n".join(problems))


def match_model(model: torch.nn.Module, model_policies: Iterable[ModelPolicy]) -> Optional[ModelPolicy]:
    """The first model policy whose class is the model's (exactly, then by qualified name)."""
    policies = list(model_policies)
    cls = type(model)
    for p in policies:
        if not isinstance(p.model, str) and p.model is cls:
            return p
    for p in policies:
        if isinstance(p.model, str) and p.model == qualname(cls):
            return p
    return None


def uncovered_layer_classes(model: torch.nn.Module, layers: Sequence[ResolvedLayer]) -> list:
    """Lint: classes of ``nn.ModuleList`` children that no policy covers, with their instance counts."""
    covered = {id(m.module) for m in layers}
    counts: dict = {}
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                if id(child) not in covered:
                    name = type(child).__name__
                    counts[name] = counts.get(name, 0) + 1
    return [f"no policy covers layer class {name} ({n} instances)" for name, n in counts.items()]


def lint_linears(layers: Sequence[ResolvedLayer]) -> list:
    """Lint: per layer class, policy rules that matched nothing and linears no rule covers."""
    seen: set = set()
    out: list = []
    for m in layers:
        key = id(m.policy)
        if key in seen:
            continue
        seen.add(key)
        _, unmatched, uncovered = m.policy.styles_for(m.module)
        name = m.policy.layer_name
        for rule in unmatched:
            out.append(f"policy for {name}: rule {rule!r} matched no submodule (first instance: {m.path})")
        for lin in uncovered:
            out.append(f"policy for {name}: linear {lin!r} is covered by no rule (first instance: {m.path})")
    return out
