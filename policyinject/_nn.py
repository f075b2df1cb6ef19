"""Small facts about ``nn.Module`` trees that several parts of policyinject need, each in one place.

Linear geometry (GPT-2 ``Conv1D`` stores its weight ``[in, out]``), submodule lookup and replacement by
dotted path, and the qualified class names policies match on.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    >>> shape_out_in(model[0])
    (8, 4)
    >>> set_submodule(model, "0", torch.nn.Identity()); type(model[0]).__name__
    'Identity'
    >>> qualname(torch.nn.Linear), join_path("model.layers.0", "mlp"), join_path("", "mlp")
    ('torch.nn.modules.linear.Linear', 'model.layers.0.mlp', 'mlp')
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["qualname", "is_conv1d", "shape_out_in", "out_features", "in_features", "set_submodule",
           "submodule_or_none", "join_path"]


def qualname(cls: type) -> str:
    """``module.QualName`` of a class (what string-named policies match).

    Example:
        >>> qualname(dict)
        'builtins.dict'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def is_conv1d(module: torch.nn.Module) -> bool:
    """True for a GPT-2 style ``Conv1D`` (weight ``[in, out]``, attribute ``nf`` = out features).

    Example:
        >>> is_conv1d(torch.nn.Linear(2, 2))
        False
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def shape_out_in(module: torch.nn.Module, transposed: bool = False) -> Tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module's weight.

    The weight is read ``[out, in]``, except for a ``Conv1D`` or when ``transposed`` (a policy's
    ``transposed`` entry); a wrapper with an inner ``.local`` linear (tensor-parallel modules) reports the
    local linear's shape.

    Example:
        >>> shape_out_in(torch.nn.Linear(2, 5)), shape_out_in(torch.nn.Linear(2, 5), transposed=True)
        ((5, 2), (2, 5))
    """
    local = getattr(module, "local", None)
    if isinstance(local, torch.nn.Module):
        return shape_out_in(local)
    w = module.weight
    if transposed or is_conv1d(module):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def out_features(module: torch.nn.Module) -> int:
    """Output features of a linear-like module (``nn.Linear``, ``Conv1D`` or anything with ``out_features``).

    Example:
        >>> out_features(torch.nn.Linear(2, 5))
        5
    """
    if is_conv1d(module):
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    return int(module.weight.shape[0])


def in_features(module: torch.nn.Module) -> int:
    """Input features of a linear-like module.

    Example:
        >>> in_features(torch.nn.Linear(2, 5))
        2
    """
    if is_conv1d(module):
        return int(module.weight.shape[0])
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[1])


def set_submodule(root: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Replace the submodule at dotted ``path`` under ``root`` by ``new``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU()))
        >>> set_submodule(m, "0.0", torch.nn.Tanh()); m[0][0]
        Tanh()
    """
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def submodule_or_none(root: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    """The submodule at ``path`` (``root`` for ``""``), or None when there is none.

    Example:
        >>> submodule_or_none(torch.nn.Linear(2, 2), "nope") is None
        True
    """
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def join_path(prefix: str, path: str) -> str:
    """``prefix.path``, leaving out an empty part.

    Example:
        >>> join_path("a", ""), join_path("a", "b")
        ('a', 'a.b')
    """
    return f"{prefix}.{path}" if prefix and path else prefix or path
