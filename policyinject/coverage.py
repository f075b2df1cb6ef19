"""Requested work that a plan cannot do is said out loud: kernel injection that finds nothing to inject.

``replace_with_kernel_inject=True`` on a model that no policy matches (or whose matched layers the
``kernel_inject`` pass keeps as they are) would otherwise succeed and change nothing. :func:`warn_if_nothing_injected`
records a lint line on the plan and emits a :class:`~policyinject.errors.NothingInjectedWarning` naming the
model class, the model types the registered plugins describe, and ``policyinject inspect``.

Example:
    >>> import torch, warnings
    >>> from policyinject import NothingInjectedWarning, PluginManager, plan_inference
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     _ = plan_inference(torch.nn.Sequential(torch.nn.Linear(4, 4)), replace_with_kernel_inject=True,
    ...                        plugins=PluginManager.empty())
    >>> [w.category.__name__ for w in caught]
    ['NothingInjectedWarning']
    >>> print(caught[0].message)  # doctest: +ELLIPSIS
    replace_with_kernel_inject=True, but nothing will be injected into Sequential: no policy matches any of its layers...
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .errors import NothingInjectedWarning

__all__ = ["nothing_injected", "warn_if_nothing_injected"]

#: ``kernel_inject`` actions that change a resolved layer.
_INJECTING = ("replace", "replace_submodules")


def _model_name(model: torch.nn.Module) -> str:
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{name} (model_type {model_type!r})" if isinstance(model_type, str) and model_type else name


def _supported(plugins: Any) -> str:
    try:
        names = sorted({info.name for info in plugins.plugins()})
    except Exception as exc:  # the warning must not hide behind a plugin that fails to list itself
        return f"(the registered plugins could not be listed: {type(exc).__name__}: {exc})"
    if not names:
        return "No plugin is registered"
    return "Policies ship for these model types (registered plugins): " + ", ".join(names)


def nothing_injected(plan: Any, model: torch.nn.Module, plugins: Any) -> Optional[str]:
    """The warning text when ``plan`` injects no layer although kernel injection was asked for; else None.

    ``plan`` is the planned :class:`~policyinject.plan.Plan` (its ``layers`` and ``kernel_inject``
    actions), ``plugins`` the :class:`~policyinject.PluginManager` used to resolve policies.

    Example:
        >>> import torch
        >>> from policyinject import PluginManager, plan_inference
        >>> plan = plan_inference(torch.nn.Linear(2, 2), plugins=PluginManager.empty())
        >>> print(nothing_injected(plan, torch.nn.Linear(2, 2), PluginManager.empty()))  # doctest: +ELLIPSIS
        replace_with_kernel_inject=True, but nothing will be injected into Linear: no policy matches ...
    """
    paths = {layer.path for layer in plan.layers}
    layer_actions = [a for a in plan.actions if a.pass_name == "kernel_inject" and a.path in paths]
    if any(a.action in _INJECTING for a in layer_actions):
        return None
    head = f"replace_with_kernel_inject=True, but nothing will be injected into {_model_name(model)}: "
    if not plan.layers:
        why = ("no policy matches any of its layers. Describe its layer class with "
               "injection_policy={LayerClass: policyinject.Policy(...)} (docs/policies.md) or install a plugin "
               "for it")
    else:
        classes = sorted({type(layer.module).__name__ for layer in plan.layers})
        reasons = sorted({str(a.details.get("reason", a.action)) for a in layer_actions}) or ["no action planned"]
        why = (f"{len(plan.layers)} layers matched ({', '.join(classes)}) but none can be injected: "
               f"{'; '.join(reasons)}")
    return f"{head}{why}. {_supported(plugins)}. `policyinject inspect` shows what matched and why."


def warn_if_nothing_injected(plan: Any, model: torch.nn.Module, config: Any, plugins: Any,
                             stacklevel: int = 2) -> None:
    """Under ``replace_with_kernel_inject``, lint and warn (:class:`NothingInjectedWarning`) when no layer is
    injected (see :func:`nothing_injected`).

    Example:
        >>> import torch, warnings
        >>> from policyinject import PluginManager, load_config, plan_inference
        >>> plan = plan_inference(torch.nn.Linear(2, 2), plugins=PluginManager.empty())
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error")
        ...     warn_if_nothing_injected(plan, torch.nn.Linear(2, 2), load_config(None), PluginManager.empty())
    """
    if not config.replace_with_kernel_inject:
        return
    message = nothing_injected(plan, model, plugins)
    if message is None:
        return
    plan.warn(message)
    warnings.warn(message, NothingInjectedWarning, stacklevel=stacklevel + 1)
