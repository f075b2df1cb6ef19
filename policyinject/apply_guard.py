"""Atomicity of apply: what a failed pass leaves behind, said loudly.

``init_inference`` applies the passes in order. Before each pass, :func:`snapshot` records a fingerprint of
every unit the pass may change (each resolved layer, and each model-level module the pass acts on: the
identity, type, dtype, device and version counter -- bumped by in-place writes -- of its submodules and
tensors). If the pass raises, the units whose
fingerprint changed are the *converted* ones; the others are *unconverted* (each pass builds a layer's
replacements before swapping any of them in, so the layer being built when it failed is among these).
:func:`fail` then poisons the model -- a forward pre-hook on the root module raises
:class:`~policyinject.errors.PoisonedModelError` -- and returns the :class:`~policyinject.errors.ApplyError`
to raise. A poisoned model is refused by planning (:func:`check_not_poisoned`). A
:class:`~policyinject.errors.PlanError` raised during apply while no unit of any pass has changed yet (a check
a pass makes as it starts) is raised as it is, and the model is not poisoned (:func:`unchanged`).

Example:
    >>> import torch
    >>> from policyinject.errors import ApplyError, PoisonedModelError
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> before = snapshot(model, ["0", "1"])
    >>> model[0] = torch.nn.Linear(2, 2)  # the pass converted layer 0, then failed on layer 1
    >>> err = fail(model, "quantize", [], ["0", "1"], before, "1", RuntimeError("out of memory"))
    >>> err.converted, err.unconverted
    (['0'], ['1'])
    >>> try:
    ...     model(torch.ones(1, 2))
    ... except PoisonedModelError as e:
    ...     print(str(e).splitlines()[0][:60])
    this model was left partly converted by a failed init_infere
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch

from .errors import ApplyError, PlanError, PoisonedModelError

__all__ = ["units_of", "snapshot", "unchanged", "fail", "check_not_poisoned", "POISON_ATTR"]

#: Attribute set on the root module of a poisoned model (the ApplyError).
POISON_ATTR = "_policyinject_apply_error"


def units_of(layer_paths: Sequence[str], action_paths: Iterable[str]) -> List[str]:
    """The units a pass is reported by: every layer path, plus each action path outside every layer.

    Example:
        >>> units_of(["m.layers.0", "m.layers.1"], ["m.layers.0.mlp", "m.embed", "m.embed"])
        ['m.layers.0', 'm.layers.1', 'm.embed']
    """
    units = list(layer_paths)
    seen = set(units)
    for p in action_paths:
        if p in seen or any(p.startswith(lp + ".") for lp in layer_paths if lp):
            continue
        if not p and layer_paths:
            continue
        seen.add(p)
        units.append(p)
    return units


def _fingerprint(model: torch.nn.Module, path: str) -> Any:
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    mods = tuple((n, id(m), type(m)) for n, m in mod.named_modules(remove_duplicate=False))
    tensors = tuple((n, id(t), t.dtype, t.device, _version(t)) for n, t in mod.named_parameters(remove_duplicate=False))
    buffers = tuple((n, id(t), t.dtype, t.device, _version(t)) for n, t in mod.named_buffers(remove_duplicate=False))
    return mods, tensors, buffers


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place write, ``copy_`` included); -1 where it has none."""
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return -1


def snapshot(model: torch.nn.Module, units: Sequence[str]) -> Dict[str, Any]:
    """Fingerprint of each unit (module identity, submodules, tensors' identity, dtype and device)."""
    return {u: _fingerprint(model, u) for u in units}


def _poison_hook(module: torch.nn.Module, args: Any, kwargs: Any = None) -> None:
    err = getattr(module, POISON_ATTR, None)
    raise PoisonedModelError(
        "this model was left partly converted by a failed init_inference and cannot compute correctly; "
        f"reload it. The failure was:\n{err}")


def fail(model: torch.nn.Module, pass_name: str, completed: List[str], units: Sequence[str],
         before: Dict[str, Any], failed_at: Optional[str], exc: BaseException) -> ApplyError:
    """Poison ``model`` and build the :class:`ApplyError` for ``exc`` raised by pass ``pass_name``."""
    converted = [u for u in units if _fingerprint(model, u) != before.get(u)]
    unconverted = [u for u in units if u not in set(converted)]
    reason = f"{type(exc).__name__}: {exc}"
    err = ApplyError(pass_name, completed, converted, unconverted, failed_at, reason)
    if getattr(model, POISON_ATTR, None) is None:
        model.register_forward_pre_hook(_poison_hook, with_kwargs=True)
    object.__setattr__(model, POISON_ATTR, err)
    return err


def unchanged(model: torch.nn.Module, before: Dict[str, Any]) -> bool:
    """Whether every unit of ``before`` (a :func:`snapshot`) still has the same fingerprint."""
    return all(_fingerprint(model, u) == fp for u, fp in before.items())


def check_not_poisoned(model: torch.nn.Module) -> None:
    """PlanError for a model a failed ``init_inference`` left partly converted."""
    err = getattr(model, POISON_ATTR, None)
    if err is not None:
        raise PlanError(f"{type(model).__name__} was left partly converted by a failed init_inference "
                        f"(pass {err.failed_pass!r}: {err.reason}); reload the model")
