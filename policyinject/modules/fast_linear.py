"""``DecodeLinear``: a 16-bit linear that runs the decode GEMV kernel for a few rows and cuBLAS otherwise.

At batch 1..``max_m`` rows (decode) ``forward`` calls :func:`policyinject.kernels.gemv.gemv` on CUDA tensors;
for more rows (prefill), on the CPU, or with ``backend="torch"`` it calls ``F.linear``. Use it only where the
benchmark (``benchmarks/quant.py``) shows the GEMV beating cuBLAS on the card; ``max_m=0`` turns the GEMV off.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(32, 8)
    >>> d = DecodeLinear.from_linear(lin)
    >>> x = torch.randn(1, 32)
    >>> torch.allclose(d(x), lin(x))
    True
    >>> DecodeLinear.cat([d, DecodeLinear.from_linear(torch.nn.Linear(32, 4, bias=False))]).out_features
    12
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._common import resolve_backend
from ..kernels.gemv import GEMV_MAX_M, gemv, gemv_gated, gemv_rms_norm

__all__ = ["DecodeLinear"]

#: Default largest batch routed to the GEMV kernel.
DEFAULT_MAX_M = 4


class DecodeLinear(nn.Module):
    """``nn.Linear`` with a decode GEMV fast path (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, backend: str = "auto",
                 max_m: int = DEFAULT_MAX_M) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"DecodeLinear takes a 2-D [out, in] weight, got {tuple(weight.shape)}")
        if not 0 <= max_m <= GEMV_MAX_M:
            raise ValueError(f"max_m must be in [0, {GEMV_MAX_M}], got {max_m}")
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend = backend
        self.max_m = int(max_m)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_linear(cls, linear: nn.Module, backend: str = "auto", max_m: int = DEFAULT_MAX_M, *,
                    transposed: bool = False) -> "DecodeLinear":
        """Wrap a linear-like module's weight (``transposed=True`` for GPT-2 ``Conv1D``), sharing no storage
        copies beyond making the weight contiguous."""
        w = linear.weight.t() if transposed else linear.weight
        return cls(w, getattr(linear, "bias", None), backend=backend, max_m=max_m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            0 < rows <= self.max_m
            and resolve_backend(self.backend, x) == "triton"
            and x.dtype == self.weight.dtype
        ):
            return gemv(x, self.weight, self.bias, backend="triton")
        return F.linear(x, self.weight, self.bias)

    def gated(self, x: torch.Tensor, activation: str) -> Optional[torch.Tensor]:
        """``silu(gate) * up`` for this layer as a fused gate|up projection in one GEMV (one activation row on
        a GPU, SwiGLU: :func:`~policyinject.kernels.gemv.gemv_gated`), else None (the caller runs the layer,
        then the activation).

        Example:
            >>> DecodeLinear.from_linear(torch.nn.Linear(32, 16)).gated(torch.randn(1, 32), "silu") is None
            True
        """
        if (activation != "silu" or self.max_m < 1 or self.out_features % 2 or x.numel() != x.shape[-1]
                or resolve_backend(self.backend, x) != "triton" or x.dtype != self.weight.dtype):
            return None
        return gemv_gated(x, self.weight, self.bias, backend="triton")

    def normed(self, x: torch.Tensor, residual: Optional[torch.Tensor], norm: Any,
               activation: Optional[str] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(self(norm(s)), s)`` with ``s = x + residual`` (``residual=None``: ``s = x``) in one kernel
        (:func:`~policyinject.kernels.gemv.gemv_rms_norm`), for one activation row on a GPU and an RMSNorm
        ``norm`` (:class:`~policyinject.modules.norms.FusedRMSNorm`) of this layer's dtype; ``activation="silu"``:
        this layer is a fused gate|up and the first result is SwiGLU's, as :meth:`gated`. Else None (the
        caller runs the norm, then the layer).

        Example:
            >>> from policyinject.modules.norms import FusedRMSNorm
            >>> DecodeLinear.from_linear(torch.nn.Linear(32, 8)).normed(torch.randn(1, 32), None,
            ...                                                          FusedRMSNorm(32)) is None  # CPU
            True
        """
        from .norms import FusedRMSNorm

        gated = activation is not None
        weight = getattr(norm, "weight", None)
        if (type(norm) is not FusedRMSNorm or weight is None or self.max_m < 1 or x.numel() != x.shape[-1]
                or (gated and (activation != "silu" or self.out_features % 2))
                or resolve_backend(self.backend, x) != "triton" or norm.backend == "torch"
                or not (x.dtype == self.weight.dtype == weight.dtype)
                or (residual is not None and residual.dtype != x.dtype)):
            return None
        return gemv_rms_norm(x, residual, weight, norm.eps, self.weight, self.bias, weight_offset=norm.weight_offset,
                             gated=gated, backend="triton")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"max_m={self.max_m}, backend={self.backend}")

    @classmethod
    def cat(cls, modules: Sequence["DecodeLinear"]) -> "DecodeLinear":
        """Concatenate output features (a missing bias counts as zeros when another piece has one)."""
        modules = list(modules)
        if not modules:
            raise ValueError("DecodeLinear.cat needs at least one module")
        if len({m.in_features for m in modules}) != 1:
            raise ValueError(f"DecodeLinear.cat needs equal in_features, got {[m.in_features for m in modules]}")
        bias = None
        if any(m.bias is not None for m in modules):
            ref = next(m.bias for m in modules if m.bias is not None)
            bias = torch.cat([m.bias if m.bias is not None else ref.new_zeros(m.out_features) for m in modules])
        first = modules[0]
        return cls(torch.cat([m.weight for m in modules], 0), bias, backend=first.backend, max_m=first.max_m)

    def narrow_out(self, start: int, length: int) -> "DecodeLinear":
        """Output rows ``start:start+length`` (and their bias)."""
        if start < 0 or length <= 0 or start + length > self.out_features:
            raise ValueError(f"narrow_out({start}, {length}) is outside out_features={self.out_features}")
        bias = None if self.bias is None else self.bias[start:start + length].clone()
        return DecodeLinear(self.weight[start:start + length].clone(), bias, backend=self.backend, max_m=self.max_m)

    def narrow_in(self, start: int, length: int, keep_bias: bool = True) -> "DecodeLinear":
        """Input columns ``start:start+length``; ``keep_bias=False`` drops the bias (row-parallel shards)."""
        if start < 0 or length <= 0 or start + length > self.in_features:
            raise ValueError(f"narrow_in({start}, {length}) is outside in_features={self.in_features}")
        bias = None if (self.bias is None or not keep_bias) else self.bias.clone()
        return DecodeLinear(self.weight[:, start:start + length].contiguous(), bias, backend=self.backend,
                            max_m=self.max_m)
