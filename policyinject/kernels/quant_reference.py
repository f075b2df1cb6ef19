"""Plain-PyTorch references for the quantized matmuls and the decode GEMV.

Both compute in float32 and return the activation's dtype; they are the ``backend="torch"`` path of
:mod:`policyinject.kernels.quant_matmul` and :mod:`policyinject.kernels.gemv`, and the oracle of their tests.
The quantized reference dequantizes the whole weight (fine for a reference, never done by the kernels).

Example:
    >>> import torch
    >>> from policyinject.kernels.quantize import quantize_weight, dequantize_weight
    >>> x, w = torch.randn(2, 64), torch.randn(16, 64)
    >>> qw = quantize_weight(w, 8)
    >>> torch.allclose(quant_matmul_reference(x, qw), x @ dequantize_weight(qw).T, atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantize import QuantizedWeight, dequantize_weight, quantize_weight

__all__ = ["quant_matmul_reference", "gemv_reference", "quantize_weight", "dequantize_weight"]


def quant_matmul_reference(
    x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x @ dequantize(qw).T + bias`` in float32, returned in ``x.dtype``; ``x`` is ``[..., in_features]``.

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> quant_matmul_reference(torch.randn(5, 3, 32), quantize_weight(torch.randn(8, 32), 4, 32)).shape
        torch.Size([5, 3, 8])
    """
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={qw.in_features}")
    w = dequantize_weight(qw, torch.float32).to(x.device)
    y = torch.matmul(x.to(torch.float32), w.t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in float32, returned in ``x.dtype`` (the reference of the decode GEMV).

    Example:
        >>> gemv_reference(torch.randn(1, 8), torch.randn(4, 8), torch.zeros(4)).shape
        torch.Size([1, 4])
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={weight.shape[1]}")
    y = torch.matmul(x.to(torch.float32), weight.to(torch.float32).t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
