"""The kernel entry points the injected modules call, resolved once per call site from ``policyinject.kernels``.

Every op takes ``backend`` (``"auto"``, ``"triton"``, ``"torch"``). The kernel families import without triton
(their Triton kernels load on first use): without it ``"auto"`` and ``"torch"`` run the PyTorch reference and
``"triton"`` raises :class:`~policyinject.errors.UnsupportedError`.
:func:`make_norm` builds the fused norm modules the injected blocks hold.

Example:
    >>> import torch
    >>> n = make_norm(torch.nn.LayerNorm(8), "layer")
    >>> x = torch.randn(2, 8)
    >>> torch.allclose(n(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..errors import PolicyError
from ..kernels import activations as _activations
from ..kernels import reference
from ..kernels import rotary as _rotary

__all__ = ["rotary", "gated_act", "activation", "make_norm"]


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str,
           backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]`` (first ``cos.shape[-1]`` dims rotated).

    Example:
        >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
        >>> one, zero = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
        >>> qo, ko = rotary(q, k, one, zero, "half", "torch")
        >>> torch.equal(qo, q)
        True
    """
    if backend == "torch":
        return reference.rotary(q, k, cos, sin, layout=layout)
    return _rotary.rotary(q, k, cos, sin, layout=layout, backend=backend)


def gated_act(gate_up: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    """``act(gate) * up`` on a fused ``[..., 2*I]`` tensor (gate first).

    Example:
        >>> gated_act(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "silu", "torch")
        tensor([[0.0000, 1.4621]])
    """
    if backend == "torch":
        return reference.gated_act(gate_up, act)
    return _activations.gated_act(gate_up, act, backend=backend)


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Element-wise activation of a plain (fc1/fc2) MLP: ``silu``, ``gelu`` (erf), ``gelu_tanh``, ``relu``, ``relu2`` (squared ReLU).

    Example:
        >>> activation(torch.tensor([-1.0, 2.0]), "relu")
        tensor([0., 2.])
    """
    if act == "relu":
        return F.relu(x)
    if act == "relu2":
        return torch.square(F.relu(x))
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "gelu":
        return F.gelu(x)
    raise PolicyError(f"unknown activation {act!r}")


def make_norm(module: torch.nn.Module, kind: str = "rms", weight_offset: float = 0.0,
              eps_attr: tuple = ("variance_epsilon", "eps", "epsilon"), backend: str = "auto",
              default_eps: Optional[float] = None) -> torch.nn.Module:
    """The fused norm module for an HF norm: :class:`~policyinject.modules.norms.FusedRMSNorm` (scaled by
    ``weight_offset + weight``) or :class:`~policyinject.modules.norms.FusedLayerNorm`, sharing its parameters.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(6)
        >>> n = make_norm(ln, "layer", backend="torch")
        >>> x, r = torch.randn(2, 6), torch.randn(2, 6)
        >>> y, s = n.forward_add(x, r)
        >>> torch.allclose(y, ln(x + r), atol=1e-6) and torch.allclose(s, x + r)
        True
    """
    from .norms import FusedLayerNorm, FusedRMSNorm, find_eps

    kind = getattr(kind, "value", kind)
    try:
        eps = find_eps(module, eps_attr)
    except ValueError as exc:
        if default_eps is None:
            raise PolicyError(str(exc)) from None
        eps = float(default_eps)
    if kind == "rms":
        return FusedRMSNorm.from_module(module, eps=eps, weight_offset=weight_offset, backend=backend)
    if kind == "layer":
        return FusedLayerNorm.from_module(module, eps=eps, backend=backend)
    raise PolicyError(f"norm kind must be 'rms' or 'layer', got {kind!r}")
