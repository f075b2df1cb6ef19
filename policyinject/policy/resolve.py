"""Every policy resolved before any pass runs, in one place.

Sources, in order of precedence for a layer class: the user's ``injection_policy`` (DeepSpeed short forms or
``Policy`` values; every path they name is checked, and a short form is merged with the plugin policy of its
class, :mod:`policyinject.policy.user_input`), a ``tensor_parallel.tp_plan`` mapping in the config, the plugins (built-in and entry
points), and -- only when tensor parallelism is asked for -- AutoTP (:mod:`policyinject.policy.autotp`: the
model's own Hugging Face plan, else name and structure heuristics). The result is the typed list of
:class:`~policyinject.policy.resolved.ResolvedLayer` that every pass sees, in model order. Nothing here
mutates the model.

Example:
    >>> import torch
    >>> from policyinject.config import load_config
    >>> from policyinject._plugin_manager import PluginManager
    >>> class Blk(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.up = torch.nn.Linear(4, 8); self.down_proj = torch.nn.Linear(8, 4)
    >>> model = torch.nn.Module(); model.layers = torch.nn.ModuleList([Blk()])
    >>> cfg = load_config(None, injection_policy={Blk: ("down_proj",)})
    >>> [(m.path, m.resolved_by.value) for m in resolve_policies(model, cfg, PluginManager.empty()).layers]
    [('layers.0', 'injection_policy')]
    >>> found = resolve_policies(model, load_config(None), PluginManager.empty(), autotp=True)
    >>> [(m.path, m.resolved_by.value, sorted(m.policy.styles)) for m in found.layers]
    [('layers.0', 'autotp:heuristic', ['down_proj', 'up'])]
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import attrs
import torch

from ..errors import PlanError
from .autotp import auto_layers, hf_plan_policies, model_hf_plan
from .matching import find_policy, lint_linears, match_layers
from .model import ModelPolicy, Policy
from .resolved import ResolvedLayer
from .user_input import check_policy_paths, check_short_form, merge_short_form

__all__ = ["ResolvedPolicies", "resolve_policies", "user_policies"]


@attrs.define
class ResolvedPolicies:
    """The outcome of policy resolution: what every pass sees."""

    #: Every covered layer, in model order.
    layers: List[ResolvedLayer] = attrs.field(factory=list)
    #: The model-level policy matched to the model class (plugins or the config's ``tp_plan``).
    model_policy: Optional[ModelPolicy] = None
    #: AutoTP only: the embedding / head styles of the model's own Hugging Face plan (no model policy matched).
    autotp_model_policy: Optional[ModelPolicy] = None
    #: The architecture config used for head counts (``config.config`` override, else ``model.config``).
    model_config: Any = None
    lint: List[str] = attrs.field(factory=list)


def user_policies(config: Any, model: Optional[torch.nn.Module] = None, plugin_policies: Sequence[Policy] = (),
                  select: Optional[Callable[[Any, str, list], Optional[Policy]]] = None) -> List[Policy]:
    """``injection_policy`` entries as :class:`Policy` values (a short form is converted; they win over plugins).

    With ``model``, every path an entry names is checked against the first instance of its class
    (:class:`~policyinject.errors.PolicyError` naming the class, the path and the closest existing children),
    and a DeepSpeed short form for a class that one of ``plugin_policies`` describes is merged with that
    policy (:func:`policyinject.policy.user_input.merge_short_form`; ``select`` picks among several).

    Example:
        >>> import torch
        >>> from policyinject.config import load_config
        >>> [p.layer_name for p in user_policies(load_config(None, injection_policy={torch.nn.Linear: "x"}))]
        ['Linear']
    """
    from ..config.class_ref import resolve_injection_policy
    from .shortforms import from_deepspeed

    # A key written as a name is a ClassRef, never imported: it is matched to the model's classes here
    # (PolicyError naming the key when it names none).
    out = []
    for layer, value in resolve_injection_policy(config.injection_policy or {}, model):
        if isinstance(value, Policy):
            policy = value if value.layer == layer else attrs.evolve(value, layer=layer)
        else:
            policy = from_deepspeed(layer, value)
        policy = policy.with_source("injection_policy")
        instance = _first_instance(model, layer) if model is not None else None
        if instance is not None:
            policy = _checked(policy, value, instance, plugin_policies, select)
        out.append(policy)
    return out


def _first_instance(model: torch.nn.Module, layer: Any) -> Optional[Tuple[str, torch.nn.Module]]:
    if not isinstance(layer, type):
        return None
    return next(((path, m) for path, m in model.named_modules() if type(m) is layer), None)


def _checked(policy: Policy, value: Any, instance: Tuple[str, torch.nn.Module], plugin_policies: Sequence[Policy],
             select: Optional[Callable[[Any, str, list], Optional[Policy]]]) -> Policy:
    """Check the paths of one user entry; merge a short form with the built-in policy of its class."""
    path, module = instance
    written = f"injection_policy[{policy.layer_name}]"
    if isinstance(value, Policy):
        check_policy_paths(policy, module, written)
        return policy
    names = (value,) if isinstance(value, str) else tuple(value)
    candidates = find_policy(type(module), plugin_policies)
    builtin = (select(module, path, candidates) if select is not None and len(candidates) > 1 else None) or \
        (candidates[0] if candidates else None)
    if builtin is None:
        check_short_form(names, module, written)
        return policy
    return merge_short_form(type(module), names, builtin, module, written)


def _config_plan_policies(model: torch.nn.Module, tp_plan: Any) -> tuple:
    if not isinstance(tp_plan, Mapping) or not tp_plan:
        return [], []
    from .shortforms import from_hf_plan

    return from_hf_plan(tp_plan, model)


def resolve_policies(model: torch.nn.Module, config: Any, plugins: Any, autotp: bool = False) -> ResolvedPolicies:
    """Resolve every layer's policy (see the module docstring); ``autotp``: tensor parallelism is asked for.

    Raises :class:`~policyinject.errors.PlanError` listing every layer AutoTP refuses.
    """
    collected = plugins.collect()
    tp_plan = config.tensor_parallel.tp_plan
    extra_user, extra_model = _config_plan_policies(model, tp_plan)
    matched = match_layers(
        model,
        user=user_policies(config, model, collected.layer_policies, plugins.select_policy) + extra_user,
        plugins=list(collected.layer_policies),
        model_policies=list(extra_model) + list(collected.model_policies),
        select=plugins.select_policy,
    )
    out = ResolvedPolicies(layers=list(matched.layers), model_policy=matched.model_policy,
                           model_config=config.config if config.config is not None else getattr(model, "config", None),
                           lint=list(matched.lint) + lint_linears(matched.layers))
    if autotp:
        hf_policies, hf_model_policy, hf_lint = hf_plan_policies(model, model_hf_plan(model, tp_plan))
        out.lint.extend(hf_lint)
        found = auto_layers(model, [m.path for m in matched.layers], hf_policies)
        if found.problems:
            raise PlanError(found.problems)
        if found.layers:
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            out.layers = sorted(out.layers + found.layers, key=lambda m: order.get(m.path, -1))
        if out.model_policy is None:
            out.autotp_model_policy = hf_model_policy
    return out
