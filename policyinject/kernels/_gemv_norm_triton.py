"""The Triton kernel of :func:`policyinject.kernels.gemv.gemv_rms_norm`: residual add, RMSNorm and a decode GEMV
(optionally with the SwiGLU epilogue) in one launch, for one activation row.

RMSNorm scales the whole row by one number, ``rstd = 1 / sqrt(mean(s**2) + eps)``, so it commutes with the
matmul: ``W @ (s * rstd * g) == rstd * (W @ (s * g))``. Each program therefore streams its weight rows once,
multiplies them by ``s * g`` (``s = x + residual`` rounded to the model's dtype, ``g`` the norm weight plus its
offset) and sums ``s**2`` along the way; ``rstd`` scales the float32 sums in the epilogue. No program waits for
a norm before its first weight load. Program 0 also stores ``s`` (the next residual). The only numerical
difference from the two-kernel path is that the normalised row is not rounded to 16 bits before the matmul.

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

__all__ = ["launch_gemv_rms_norm"]


@triton.jit
def _gemv_rms_norm_kernel(
    X, R, G, W, B, Y, S,
    N, K, stride_wn, eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    GATED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_k = tl.arange(0, BK)
    rows = tile_rows(pid_n, N, BN, GATED)
    w_ptrs = W + rows[:, None] * stride_wn + offs_k[None, :]
    acc2 = tl.zeros((BN, BK), dtype=tl.float32)
    squares = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        w = load_weight(w_ptrs + k0, kk, K, EVEN_K)
        s = load_act(X + kk, kk, K, EVEN_K)
        if HAS_RESIDUAL:
            s = (s + load_act(R + kk, kk, K, EVEN_K)).to(S.dtype.element_ty)
            tl.store(S + kk, s, mask=(kk < K) & (pid_n == 0))
            s = s.to(tl.float32)  # normalise the rounded sum, as the two-kernel path does
        squares += s * s
        acc2 += w * (s * (load_act(G + kk, kk, K, EVEN_K) + offset))[None, :]
    rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.sum(acc2, axis=1) * rstd
    if GATED:
        store_gated(Y, acc, B, rows, pid_n, N, HAS_BIAS, BN)
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
        store_tile(Y, acc[:, None], B, rows, tl.arange(0, 1), offs_n, 1, N, N, 0, HAS_BIAS, 1)


def launch_gemv_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                         offset: float, weight: torch.Tensor, bias: Optional[torch.Tensor], config: Mapping,
                         gated: bool) -> "tuple[torch.Tensor, Optional[torch.Tensor]]":
    """Launch on one contiguous row ``x [K]``; returns ``(y [N], s [K] or None)`` (``s`` only with a residual).
    ``config``: ``BN`` (even when ``gated``), ``BK``, ``num_warps``."""
    triton_launchable(_gemv_rms_norm_kernel, x, weight)
    k = x.shape[-1]
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    bn, bk = int(config["BN"]), int(config["BK"])
    if gated and bn % 2:
        raise ValueError(f"the gated GEMV with RMSNorm takes an even BN, got {dict(config)}")
    outputs = bn // 2 if gated else bn
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    s = torch.empty_like(x) if residual is not None else None
    _gemv_rms_norm_kernel[(cdiv(n, outputs),)](
        x, residual if residual is not None else x, norm_weight, weight, bias if bias is not None else weight, y,
        s if s is not None else x, n, k, weight.stride(0), float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BN=bn, BK=bk, EVEN_K=k % bk == 0,
        GATED=gated, num_warps=int(config.get("num_warps", 4)),
    )
    return y, s
