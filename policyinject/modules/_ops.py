"""The kernel entry points the injected modules call, resolved once per call site from ``policyinject.kernels``.

Every op takes ``backend`` (``"auto"``, ``"triton"``, ``"torch"``). When a kernel family is not importable
(for example triton is absent), ``"auto"`` and ``"torch"`` run the PyTorch reference and ``"triton"`` raises.
:class:`InjectedNorm` is the norm the injected blocks hold (RMSNorm or LayerNorm, with the residual add
fused: ``forward_add``).

Example:
    >>> import torch
    >>> n = InjectedNorm.from_module(torch.nn.LayerNorm(8), "layer")
    >>> x = torch.randn(2, 8)
    >>> torch.allclose(n(x), torch.nn.functional.layer_norm(x, (8,)), atol=1e-6)
    True
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import PolicyError, UnsupportedError
from ..kernels import reference

__all__ = ["rotary", "gated_act", "activation", "InjectedNorm", "eps_of"]


def _kernel(family: str, name: str, backend: str) -> Optional[Any]:
    """The kernel function ``policyinject.kernels.<family>.<name>``, or None to use the reference."""
    try:
        module = importlib.import_module(f"policyinject.kernels.{family}")
    except ImportError as exc:
        if backend == "triton":
            raise UnsupportedError(f"backend='triton' needs policyinject.kernels.{family}: {exc}") from exc
        return None
    fn = getattr(module, name, None)
    if fn is None and backend == "triton":
        raise UnsupportedError(f"policyinject.kernels.{family} has no {name}")
    return fn


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
    fn = None if backend == "torch" else _kernel("rotary", "rotary", backend)
    if fn is None:
        return reference.rotary(q, k, cos, sin, layout=layout)
    return fn(q, k, cos, sin, layout=layout, backend=backend)


def gated_act(gate_up: torch.Tensor, act: str, backend: str) -> torch.Tensor:
    """``act(gate) * up`` on a fused ``[..., 2*I]`` tensor (gate first).

    Example:
        >>> gated_act(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "silu", "torch")
        tensor([[0.0000, 1.4621]])
    """
    fn = None if backend == "torch" else _kernel("activations", "gated_act", backend)
    if fn is None:
        return reference.gated_act(gate_up, act)
    return fn(gate_up, act, backend=backend)


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """Element-wise activation of a plain (fc1/fc2) MLP: ``silu``, ``gelu`` (erf), ``gelu_tanh``, ``relu``.

    Example:
        >>> activation(torch.tensor([-1.0, 2.0]), "relu")
        tensor([0., 2.])
    """
    if act == "relu":
        return F.relu(x)
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "gelu":
        return F.gelu(x)
    raise PolicyError(f"unknown activation {act!r}")


def eps_of(module: torch.nn.Module, names: tuple = ("variance_epsilon", "eps", "epsilon")) -> float:
    """The epsilon a norm module holds (first attribute present among ``names``).

    Example:
        >>> eps_of(torch.nn.LayerNorm(4, eps=1e-3))
        0.001
    """
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise PolicyError(f"norm {type(module).__name__} has none of the epsilon attributes {list(names)}")


class InjectedNorm(torch.nn.Module):
    """RMSNorm (``kind="rms"``, scaled by ``weight_offset + weight``) or LayerNorm, on the fused kernels.

    ``forward(x)`` normalises; ``forward_add(x, residual)`` returns ``(norm(x + residual), x + residual)`` in
    one pass. The weight and bias are the original module's parameters (shared, not copied).

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(6)
        >>> n = InjectedNorm.from_module(ln, "layer")
        >>> x, r = torch.randn(2, 6), torch.randn(2, 6)
        >>> y, s = n.forward_add(x, r)
        >>> torch.allclose(y, ln(x + r), atol=1e-6) and torch.allclose(s, x + r)
        True
    """

    def __init__(self, weight: Optional[torch.nn.Parameter], bias: Optional[torch.nn.Parameter], eps: float,
                 kind: str = "rms", weight_offset: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        if kind not in ("rms", "layer"):
            raise PolicyError(f"norm kind must be 'rms' or 'layer', got {kind!r}")
        self.weight = weight
        self.bias = bias
        self.eps = float(eps)
        self.kind = kind
        self.weight_offset = float(weight_offset)
        self.backend = backend

    @classmethod
    def from_module(cls, module: torch.nn.Module, kind: str = "rms", weight_offset: float = 0.0,
                    eps_attr: tuple = ("variance_epsilon", "eps", "epsilon"), backend: str = "auto") -> "InjectedNorm":
        """Build from an HF norm module (``weight``/``bias`` shared; epsilon read from ``eps_attr``)."""
        kind = getattr(kind, "value", kind)
        return cls(getattr(module, "weight", None), getattr(module, "bias", None), eps_of(module, eps_attr),
                   kind, weight_offset, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import norms

        if self.kind == "rms":
            return norms.rms_norm(x, self.weight, self.eps, self.weight_offset, backend=self.backend)
        return norms.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from ..kernels import norms

        if self.kind == "rms":
            return norms.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset, backend=self.backend)
        return norms.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        n = None if self.weight is None else self.weight.shape[0]
        off = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{self.kind}, {n}, eps={self.eps}{off}, backend={self.backend}"
