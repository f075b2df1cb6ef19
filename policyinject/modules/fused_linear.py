"""Concatenate linears once at injection time, and turn GPT-2 ``Conv1D`` into ``nn.Linear``.

Kernel injection runs q/k/v (and gate/up) as one matmul: :func:`fuse_linears` concatenates the output
features of several linears into one module, once, when the model is transformed; nothing is concatenated
per call. Plain ``nn.Linear`` (and subclasses such as Falcon's ``FalconLinear``) become one ``nn.Linear``;
GPT-2 ``Conv1D`` (weight stored ``[in, out]``) is transposed first; any other type (quantized or
tensor-parallel linears) must provide a ``cat(modules)`` classmethod that does the same for its own storage.

Example:
    >>> import torch
    >>> q, k = torch.nn.Linear(4, 6), torch.nn.Linear(4, 2)
    >>> qk = fuse_linears([q, k])
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(qk(x), torch.cat([q(x), k(x)], -1))
    True
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._nn import in_features, is_conv1d, out_features
from ..errors import PolicyError

__all__ = ["fuse_linears", "as_linear", "is_conv1d", "out_features", "in_features"]


def _new_linear(weight: torch.Tensor, bias: "torch.Tensor | None") -> torch.nn.Linear:
    out_f, in_f = weight.shape
    lin = torch.nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias, requires_grad=False)
    return lin


def as_linear(module: torch.nn.Module) -> torch.nn.Module:
    """``Conv1D`` -> an equivalent ``nn.Linear`` (weight transposed once); ``nn.Linear`` subclasses -> a plain
    ``nn.Linear`` sharing the same parameters; anything else is returned unchanged.

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> c = Conv1D(6, 4)                       # nf=6 outputs, nx=4 inputs, weight [4, 6]
        >>> lin = as_linear(c)
        >>> x = torch.randn(2, 4)
        >>> type(lin).__name__, tuple(lin.weight.shape), torch.allclose(lin(x), c(x), atol=1e-6)
        ('Linear', (6, 4), True)
    """
    if is_conv1d(module):
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return _new_linear(module.weight.detach().t().contiguous(), bias)
    if type(module) is torch.nn.Linear or not _plain(module):
        return module
    if isinstance(module, torch.nn.Linear):
        bias = module.bias.detach() if module.bias is not None else None
        return _new_linear(module.weight.detach(), bias)
    return module


def _plain(module: torch.nn.Module) -> bool:
    """``Conv1D``, ``nn.Linear``, or an ``nn.Linear`` subclass that only changes ``forward`` (``FalconLinear``):
    floating weight and bias, nothing else stored, no ``cat`` of its own."""
    if is_conv1d(module) or type(module) is torch.nn.Linear:
        return True
    if not isinstance(module, torch.nn.Linear) or callable(getattr(type(module), "cat", None)):
        return False
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return names <= {"weight", "bias"} and module.weight.is_floating_point()


def fuse_linears(modules: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """One module computing ``cat([m(x) for m in modules], -1)`` with a single matmul.

    ``nn.Linear`` (and subclasses) and ``Conv1D`` are concatenated into one ``nn.Linear``; biases are
    concatenated too (a missing bias counts as zeros when another piece has one). Other types must all be the
    same class and provide ``cat(modules)``.

    Example:
        >>> import torch
        >>> gate, up = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 8, bias=False)
        >>> fused = fuse_linears([gate, up])
        >>> tuple(fused.weight.shape)
        (16, 4)
    """
    modules = list(modules)
    if not modules:
        raise PolicyError("fuse_linears needs at least one module")
    if len(modules) == 1:
        return as_linear(modules[0])
    if all(_plain(m) for m in modules):
        pieces = [as_linear(m) for m in modules]
        ins = {p.in_features for p in pieces}
        if len(ins) != 1:
            raise PolicyError(f"cannot fuse linears with different input features {sorted(ins)}")
        weight = torch.cat([p.weight.detach() for p in pieces], dim=0)
        bias = None
        if any(p.bias is not None for p in pieces):
            bias = torch.cat([
                p.bias.detach() if p.bias is not None
                else torch.zeros(p.out_features, dtype=p.weight.dtype, device=p.weight.device)
                for p in pieces
            ])
        return _new_linear(weight, bias)
    kinds = {type(m) for m in modules}
    if len(kinds) == 1:
        cls = kinds.pop()
        cat = getattr(cls, "cat", None)
        if callable(cat):
            return cat(modules)
        raise PolicyError(
            f"cannot fuse {cls.__module__}.{cls.__qualname__} modules: the class has no `cat(modules)` "
            f"classmethod (nn.Linear, Conv1D and classes with `cat` can be fused)"
        )
    names = sorted(f"{k.__module__}.{k.__qualname__}" for k in kinds)
    raise PolicyError(f"cannot fuse linears of different types: {', '.join(names)}")
