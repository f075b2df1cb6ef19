"""The Triton kernel of :mod:`policyinject.kernels.gemv` (16-bit decode GEMV) and its launcher.

A Triton-only module: :mod:`policyinject.kernels.gemv` imports it through
:func:`~policyinject.kernels._common.load_kernel_module` on the Triton path only.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, triton_launchable
from ._gemv_epilogue_triton import load_act, load_weight, store_gated, store_tile, tile_rows
from .gemv import outputs_per_program, split_k_output

__all__ = ["launch_gemv"]


@triton.jit
def _gemv_kernel(
    X, W, B, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,  # power of two >= ROWS (accumulator width)
    ROWS: tl.constexpr,  # activation rows handled (== M; the loop over them is unrolled)
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GATED: tl.constexpr = False,  # fused gate|up weight (2 N rows), SwiGLU epilogue (_gemv_epilogue_triton)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    # Out-of-range rows are clamped (their results are never stored), so no load needs a row mask.
    rows = tile_rows(pid_n, N, BN, GATED)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k[None, :]
    # BM == 1: accumulate elementwise in the weight tile's own layout and reduce once at the end (no
    # shuffles in the loop). BM > 1: reduce each activation row's product per step into acc_t[:, m].
    acc2 = tl.zeros((BN, BK), dtype=tl.float32)
    acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    k_start = tl.multiple_of(pid_k * K_PER_SPLIT, BK)  # K_PER_SPLIT is a multiple of BK
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + offs_k
        w = load_weight(w_ptrs + k0, kk, k_end, EVEN_K)
        if BM == 1:
            acc2 += w * load_act(X + kk, kk, k_end, EVEN_K)[None, :]
        else:
            for m in tl.static_range(ROWS):
                xm = load_act(X + m * stride_xm + kk, kk, k_end, EVEN_K)
                part = tl.sum(w * xm[None, :], axis=1)
                acc_t += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
    if GATED:
        store_gated(Y, tl.sum(acc2, axis=1), B, rows, pid_n, N, HAS_BIAS, BN)
    else:
        if BM == 1:
            acc_t = tl.sum(acc2, axis=1)[:, None]
        store_tile(Y, acc_t, B, rows, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)


def launch_gemv(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config: Mapping,
                gated: bool = False) -> torch.Tensor:
    """Launch :func:`_gemv_kernel` on ``[M, K]`` rows ``x2`` with a full ``config`` (``BM`` set); ``gated``: a
    fused gate|up ``weight`` and the SwiGLU epilogue."""
    triton_launchable(_gemv_kernel, x2, weight)
    m, k = x2.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    bm, bn, bk = int(config["BM"]), int(config["BN"]), int(config["BK"])
    split_k = int(config.get("split_k", 1))
    if bm < m:
        raise ValueError(f"config BM={bm} is smaller than the batch M={m}")
    outputs = outputs_per_program(bn, gated, m, split_k, config, "GEMV")
    y, k_per_split, split_k = split_k_output(x2, n, k, split_k, bk)
    even_k = k % k_per_split == 0
    grid = (cdiv(n, outputs), split_k)
    _gemv_kernel[grid](
        x2, weight, bias if bias is not None else weight, y,
        m, n, k, k_per_split,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BM=bm, ROWS=m, BN=bn, BK=bk, EVEN_K=even_k, SPLIT_K=split_k, GATED=gated,
        num_warps=int(config.get("num_warps", 4)),
    )
    return y.to(x2.dtype) if split_k > 1 else y
