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
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


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
    STREAM: tl.constexpr = False,  # evict-first loads and streaming stores (data touched once)
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
        if STREAM:
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        else:
            x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            if STREAM:
                r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
            else:
                r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(S.dtype.element_ty)
            tl.store(S + rows64[:, None] * stride_sm + cols[None, :], s, mask=mask)
            x = s.to(tl.float32)  # normalise the rounded sum, as HF does
        if IS_RMS:
            var = tl.sum(x * x, axis=1) / N
            y = x * tl.rsqrt(var + eps)[:, None]
        else:
            # one reduction pass over (d, d^2) with d = x - x[row, 0] (the shift keeps E[d^2] - E[d]^2 free of
            # cancellation when |mean| >> std), instead of a mean pass followed by a variance pass
            x0 = tl.load(X + rows64 * stride_xm, mask=rows < M, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:  # any shift near the mean will do: x[row, 0] + r[row, 0] need not be rounded
                x0 += tl.load(R + rows64 * stride_rm, mask=rows < M, other=0.0).to(tl.float32)
            d = tl.where(mask, x - x0[:, None], 0.0)
            s1, s2 = tl.reduce((d, d * d), 1, _add_pair)
            dmean = s1 / N
            var = tl.maximum(s2 / N - dmean * dmean, 0.0)
            y = (d - dmean[:, None]) * tl.rsqrt(var + eps)[:, None]
        if HAS_WEIGHT:
            y = y * w[None, :]
        if HAS_BIAS:
            y = y + b[None, :]
        if STREAM:
            tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask,
                     cache_modifier=".cs")
        else:
            tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
