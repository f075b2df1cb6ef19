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
def _dequant_kernel(Q, S, Z, OUT, N, K, s_qn, s_sn, s_on, G: tl.constexpr,
                    BITS: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``OUT[n, c] = (q[n, c] - z[n, c // G]) * s[n, c // G]`` over a ``[BN, BK]`` tile.

    The scales of a tile are loaded once per row and group and broadcast in registers: ``G % BK == 0`` (or one
    scale per row, ``G >= K``): one per row; ``BK % G == 0``: ``BK // G`` per row. int4 works on the packed
    bytes (both nibbles of a byte share a group) and interleaves the low (even column) and high nibbles last.
    """
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    k0 = tl.program_id(1) * BK
    PER: tl.constexpr = 1 if BITS == 8 else 2  # values per stored byte
    W: tl.constexpr = BK // PER  # bytes of a row per tile
    NG: tl.constexpr = BK // G if BK >= G else 1  # groups per tile
    byte = k0 // PER + tl.arange(0, W)
    ok = row_ok[:, None] & (byte < K // PER)[None, :]
    if NG == 1:
        s = tl.load(S + rows * s_sn + k0 // G, mask=row_ok, other=0).to(tl.float32)[:, None]
        if HAS_Z:
            z = tl.load(Z + rows * s_sn + k0 // G, mask=row_ok, other=0).to(tl.float32)[:, None]
    else:
        grp = k0 // G + tl.arange(0, NG)
        g_ok = row_ok[:, None] & (grp < tl.cdiv(K, G))[None, :]
        s2 = tl.load(S + rows[:, None] * s_sn + grp[None, :], mask=g_ok, other=0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s2[:, :, None], (BN, NG, W // NG)), (BN, W))
        if HAS_Z:
            z2 = tl.load(Z + rows[:, None] * s_sn + grp[None, :], mask=g_ok, other=0).to(tl.float32)
            z = tl.reshape(tl.broadcast_to(z2[:, :, None], (BN, NG, W // NG)), (BN, W))
    b = tl.load(Q + rows[:, None] * s_qn + byte[None, :], mask=ok, other=0)
    if BITS == 8:
        q = b.to(tl.float32)
        if HAS_Z:
            q = q - z
        tl.store(OUT + rows[:, None] * s_on + byte[None, :], (q * s).to(OUT.dtype.element_ty), mask=ok)
    else:
        b = b.to(tl.int32)
        lo = ((b & 15) - 8).to(tl.float32)
        hi = (((b >> 4) & 15) - 8).to(tl.float32)
        if HAS_Z:
            lo = lo - z
            hi = hi - z
        out = tl.reshape(tl.join(lo * s, hi * s), (BN, BK)).to(OUT.dtype.element_ty)  # low nibble = even column
        cols = k0 + tl.arange(0, BK)
        tl.store(OUT + rows[:, None] * s_on + cols[None, :], out, mask=row_ok[:, None] & (cols < K)[None, :])


#: The group constant of a per-channel weight: larger than any K, so every tile has one scale per row.
PER_CHANNEL = 1 << 30


def _tile_k(k: int, group: int, want: int) -> int:
    """A K tile (power of two, at most ``want``) that never splits a group across tiles unevenly: a divisor of
    the group, or a multiple of it (``group`` a power of two dividing ``want``); per channel, any."""
    if group >= k:  # one scale per row
        return want
    bk = want
    while bk > 1 and group % bk and bk % group:
        bk //= 2
    return bk


def dequantize_into(qw: QuantizedWeight, out: torch.Tensor, bn: int = 16, bk: int = 512) -> torch.Tensor:
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
    group = qw.group_size
    bk = _tile_k(k, group, bk)
    if qw.num_bits == 4 and (bk < 2 or (group < k and group % 2)):
        raise ValueError(f"int4 group_size={group} cannot be tiled (it must be even)")
    z = qw.zeros if qw.zeros is not None else s
    _dequant_kernel[(cdiv(n, bn), cdiv(k, bk))](
        q, s, z, out, n, k, q.stride(0), s.stride(0), out.stride(0), G=group if group < k else PER_CHANNEL,
        BITS=qw.num_bits, HAS_Z=qw.zeros is not None, BN=bn, BK=bk, num_warps=4)
    return out


def launch_dequant_matmul(x2: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x2 @ dequant(qw).T + bias``: the weight dequantized into a scratch matrix of ``x2``'s dtype, then
    ``torch.nn.functional.linear`` (cuBLAS on a GPU). The scratch is freed on return (the caching allocator
    keeps it for the next layer)."""
    w = dequantize_into(qw, torch.empty(qw.out_features, qw.in_features, dtype=x2.dtype, device=x2.device))
    b = bias.to(x2.dtype) if bias is not None and bias.dtype != x2.dtype else bias
    return torch.nn.functional.linear(x2, w, b)
