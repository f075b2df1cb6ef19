"""Drop-in fused norm modules built on :mod:`policyinject.kernels.norms`.

- :class:`FusedRMSNorm`: equivalent to HF ``LlamaRMSNorm`` (``weight_offset=0.0``) and to Gemma-style norms
  that scale by ``(1 + weight)`` (``weight_offset=1.0``).
- :class:`FusedLayerNorm`: equivalent to ``nn.LayerNorm`` over the last dim (with or without weight/bias).

Both have ``forward(x)`` and ``forward_add(x, residual) -> (normed, x + residual)`` (residual add fused in the
same kernel), and a ``backend`` attribute (``"auto" | "triton" | "torch"``). ``from_module`` keeps the existing
``weight``/``bias`` Parameters (the same objects, no copy), so state dicts and tied/sharded weights carry over.

Numerics: float32 math with one rounding at the end. HF's ``LlamaRMSNorm`` rounds the normalised value to the
input dtype *before* multiplying by the weight, so bf16/fp16 outputs may differ from it by one unit in the
last place; the output dtype is ``x.dtype`` (HF Llama would promote to the weight's dtype if the two differ).

Example:
    >>> import torch
    >>> from policyinject.modules.norms import FusedRMSNorm
    >>> norm = FusedRMSNorm(8, eps=1e-6, backend="torch")
    >>> x = torch.randn(2, 3, 8)
    >>> y, s = norm.forward_add(x, x)
    >>> torch.allclose(y, norm(2 * x)), torch.equal(s, 2 * x)
    (True, True)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from policyinject.kernels import norms as K
from policyinject.kernels._common import BACKENDS

__all__ = ["FusedRMSNorm", "FusedLayerNorm", "find_eps"]

#: Attributes that hold epsilon on HF norm modules, first present wins (same order as ``NormSpec.eps_attr``).
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def find_eps(module: nn.Module, attrs: Sequence[str] = EPS_ATTRS) -> float:
    """Epsilon stored on an existing norm module (``variance_epsilon`` on Llama, ``eps`` on Gemma and
    ``nn.LayerNorm``); raises ``ValueError`` naming the module class when none is present.

    Example:
        >>> find_eps(torch.nn.LayerNorm(4, eps=1e-3))
        0.001
    """
    for name in attrs:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"{type(module).__name__}: no epsilon attribute among {tuple(attrs)}; pass eps=...")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dim: ``x / sqrt(mean(x**2) + eps) * (weight_offset + weight)``.

    Args:
        hidden_size: size of the last dim (ignored when ``weight`` is given).
        eps: added to the mean square.
        weight_offset: 0.0 (Llama) or 1.0 (Gemma-style ``1 + weight``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; may be changed later by assigning the attribute.
        weight: an existing Parameter to use as is (shared, not copied); ``None`` creates one
            (ones, or zeros when ``weight_offset == 1.0``, so a fresh module is the identity scale).

    Example:
        >>> import torch
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> hf = LlamaRMSNorm(16, eps=1e-5)
        >>> fused = FusedRMSNorm.from_module(hf, backend="torch")
        >>> fused.weight is hf.weight, fused.eps
        (True, 1e-05)
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(fused(x), hf(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        hidden_size: Optional[int] = None,
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        backend: str = "auto",
        *,
        weight: Optional[nn.Parameter] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if weight is None:
            if hidden_size is None:
                raise ValueError("FusedRMSNorm needs hidden_size or weight")
            init = torch.zeros if weight_offset == 1.0 else torch.ones
            weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.weight = weight
        self.eps = float(eps)
        self.weight_offset = float(weight_offset)
        self.backend = _check_backend(backend)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        eps: Optional[float] = None,
        weight_offset: float = 0.0,
        backend: str = "auto",
    ) -> "FusedRMSNorm":
        """Build from an HF RMSNorm (``LlamaRMSNorm``, ``GemmaRMSNorm``, ...), sharing its ``weight``.

        ``eps=None`` reads it from the module (:func:`find_eps`). ``weight_offset`` is not guessed: pass 1.0
        for Gemma-style norms (the policy's ``NormSpec.weight_offset``).
        """
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"{type(module).__name__} has no weight Parameter to fuse")
        return cls(
            eps=find_eps(module) if eps is None else eps,
            weight_offset=weight_offset,
            backend=backend,
            weight=weight,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps, self.weight_offset, backend=self.backend)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``s = x + residual``; returns ``(self(s), s)`` from one kernel."""
        return K.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, weight_offset={self.weight_offset}, backend={self.backend!r}"


class FusedLayerNorm(nn.Module):
    """LayerNorm over the last dim, like ``nn.LayerNorm(hidden_size)``; ``weight``/``bias`` may be ``None``.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(12, eps=1e-5)
        >>> fused = FusedLayerNorm.from_module(ln, backend="torch")
        >>> fused.weight is ln.weight and fused.bias is ln.bias
        True
        >>> x = torch.randn(3, 12)
        >>> torch.allclose(fused(x), ln(x), atol=1e-6)
        True
    """

    def __init__(
        self,
        hidden_size: Optional[int] = None,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        backend: str = "auto",
        *,
        weight: Optional[nn.Parameter] = None,
        bias_param: Optional[nn.Parameter] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if weight is None and bias_param is None and elementwise_affine:
            if hidden_size is None:
                raise ValueError("FusedLayerNorm needs hidden_size or weight")
            weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            if bias:
                bias_param = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        self.register_parameter("weight", weight)
        self.register_parameter("bias", bias_param)
        self.eps = float(eps)
        self.backend = _check_backend(backend)

    @classmethod
    def from_module(cls, module: nn.Module, eps: Optional[float] = None, backend: str = "auto") -> "FusedLayerNorm":
        """Build from ``nn.LayerNorm`` (or any module with ``weight``/``bias``/``eps``), sharing its Parameters.

        Only a 1-d ``normalized_shape`` (the last dim) is supported.
        """
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) != 1:
            raise ValueError(f"{type(module).__name__}: normalized_shape {tuple(shape)} is not 1-d")
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        return cls(
            eps=find_eps(module) if eps is None else eps,
            elementwise_affine=weight is not None,
            backend=backend,
            weight=weight,
            bias_param=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``s = x + residual``; returns ``(self(s), s)`` from one kernel."""
        return K.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"{shape}, eps={self.eps}, bias={self.bias is not None}, backend={self.backend!r}"
