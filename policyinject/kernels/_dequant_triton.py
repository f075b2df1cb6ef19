"""Dequantization of a whole quantized weight to a 16-bit (or float32) scratch matrix: ``_dequant_kernel``.

The large-M path of :func:`~policyinject.kernels.quant_matmul.quant_matmul` (kernel ``"dequant"``): one pass
that reads the int8 or packed int4 weight with its scales and zero points and writes ``(q - z) * s`` in the
activation dtype, then cuBLAS multiplies. Above a few hundred activation rows the extra write and read of
the weight is a small part of the matmul, and cuBLAS's tensor-core tiles beat the dequantize-in-tile kernel.

A Triton-only module, imported through :func:`~policyinject.kernels._common.load_kernel_module` on the Triton
path only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, triton_launchable
from .quantize import QuantizedWeight

__all__ = ["dequantize_into", "launch_dequant_matmul"]


@triton.jit
def _dequant_kernel(Q, S, Z, OUT, N, K, G, s_qn, s_sn, s_on,
                    BITS: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``OUT[n, c] = (q[n, c] - z[n, c // G]) * s[n, c // G]`` over a ``[BN, BK]`` tile."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    if BITS == 8:
        q = tl.load(Q + rows[:, None] * s_qn + cols[None, :], mask=ok, other=0).to(tl.float32)
    else:
        half = tl.program_id(1) * (BK // 2) + tl.arange(0, BK // 2)
        hok = row_ok[:, None] & (half < K // 2)[None, :]
        b = tl.load(Q + rows[:, None] * s_qn + half[None, :], mask=hok, other=0).to(tl.int32)
        lo = (b & 15) - 8
        hi = ((b >> 4) & 15) - 8
        q = tl.reshape(tl.join(lo, hi), (BN, BK)).to(tl.float32)  # low nibble = even column
    grp = cols // G
    s = tl.load(S + rows[:, None] * s_sn + grp[None, :], mask=ok, other=0).to(tl.float32)
    if HAS_Z:
        q = q - tl.load(Z + rows[:, None] * s_sn + grp[None, :], mask=ok, other=0).to(tl.float32)
    tl.store(OUT + rows[:, None] * s_on + cols[None, :], (q * s).to(OUT.dtype.element_ty), mask=ok)


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor, bn: int = 32, bk: int = 256) -> torch.Tensor:
    """Write the weight ``qw`` stands for into ``out`` (``[out_features, in_features]``, row-major); returns
    ``out``. Equal to :func:`~policyinject.kernels.quantize.dequantize_weight` rounded to ``out``'s dtype."""
    n, k = qw.out_features, qw.in_features
    if tuple(out.shape) != (n, k) or out.stride(-1) != 1:
        raise ValueError(f"dequantize_into needs a row-major [{n}, {k}] output, got {tuple(out.shape)}")
    if qw.num_bits == 4 and k % 2:
        raise ValueError(f"a packed int4 weight has an even in_features, got {k}")
    q, s = qw.qweight, qw.scales
    if q.stride(-1) != 1 or s.stride(-1) != 1 or (qw.zeros is not None and qw.zeros.stride() != s.stride()):
        raise ValueError("dequantize_into needs row-major qweight/scales (and zeros laid out as the scales)")
    triton_launchable(_dequant_kernel, q, s, out)
    z = qw.zeros if qw.zeros is not None else s
    _dequant_kernel[(cdiv(n, bn), cdiv(k, bk))](
        q, s, z, out, n, k, qw.group_size, q.stride(0), s.stride(0), out.stride(0),
        BITS=qw.num_bits, HAS_Z=qw.zeros is not None, BN=bn, BK=bk, num_warps=4)
    return out


def launch_dequant_matmul(x2: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x2 @ dequant(qw).T + bias``: the weight dequantized into a scratch matrix of ``x2``'s dtype, then
    ``torch.nn.functional.linear`` (cuBLAS on a GPU). The scratch is freed on return (the caching allocator
    keeps it for the next layer)."""
    w = dequantize_into(qw, torch.empty(qw.out_features, qw.in_features, dtype=x2.dtype, device=x2.device))
    b = bias.to(x2.dtype) if bias is not None and bias.dtype != x2.dtype else bias
    return torch.nn.functional.linear(x2, w, b)
