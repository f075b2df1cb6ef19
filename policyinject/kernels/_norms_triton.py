"""Triton kernel of the norm family (imported lazily by :mod:`policyinject.kernels.norms`).

One kernel covers RMSNorm and LayerNorm, each with or without the preceding residual add. A program owns a
``[BLOCK_M, BLOCK_N]`` tile (``BLOCK_M`` whole rows, ``BLOCK_N >= N``) and, when the grid is smaller than the
number of tiles, walks tiles with a grid stride (persistent mode). Each input element is read once and each
output written once; all arithmetic is float32 (loads are upcast first: the interpreter cannot do bf16 math).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def norm_fwd_kernel(
    X,  # [M, N] input (row stride stride_xm, unit column stride)
    R,  # [M, N] residual (unused unless HAS_RESIDUAL)
    W,  # [N] weight (unused unless HAS_WEIGHT)
    B,  # [N] bias (unused unless HAS_BIAS)
    Y,  # [M, N] normed output
    S,  # [M, N] new residual x + r (unused unless HAS_RESIDUAL)
    M,
    N,
    stride_xm,
    stride_rm,
    stride_ym,
    stride_sm,
    eps,
    weight_offset,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    num_tiles = tl.cdiv(M, BLOCK_M)
    for tile in range(pid, num_tiles, nprog):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        mask = (rows < M)[:, None] & col_mask[None, :]
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + rows64[:, None] * stride_sm + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)  # normalise the rounded sum, as HF does
        if IS_RMS:
            var = tl.sum(x * x, axis=1) / N
            y = x * tl.rsqrt(var + eps)[:, None]
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / N
            y = xc * tl.rsqrt(var + eps)[:, None]
        if HAS_WEIGHT:
            y = y * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
