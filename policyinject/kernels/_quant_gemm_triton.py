"""The Triton tl.dot kernel of the quantized matmul (:mod:`policyinject.kernels.quant_matmul`) for prefill
and batched decode: ``_qgemm_kernel``.

Tiles of ``[BM, BN]`` with ``tl.dot`` on the dequantized integers (exact in bf16/fp16), one K step never
crossing a group, so the group scale applies to the partial product of the step (``MULTI_GROUP``: a step of
several whole groups, the scales applied to the weights before the dot). int4 splits the activation into
even and odd columns and does two dots against the low and high nibbles.

A Triton-only module, imported through :func:`~policyinject.kernels._common.load_kernel_module` on the Triton
path only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._quant_gemv_triton import _int_to_f32


@triton.jit
def _rows_of_groups(ptrs, NG: tl.constexpr, ROWS: tl.constexpr, BN: tl.constexpr):
    """``[NG, BN]`` per-group values (scales or zero points) as float32, each repeated over its group's
    ``ROWS // NG`` rows of a ``[ROWS, BN]`` weight tile."""
    v = tl.load(ptrs).to(tl.float32)
    return tl.reshape(tl.broadcast_to(v[:, None, :], (NG, ROWS // NG, BN)), (ROWS, BN))

@triton.jit
def _qgemm_kernel(
    X, QW, S, Z, B, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot in float32 (interpreter, float32 activations) instead of x's dtype
    GROUP_M: tl.constexpr,
    MULTI_GROUP: tl.constexpr = False,  # BK spans several groups (scales applied to the weights)
):
    BKW: tl.constexpr = BK if BITS == 8 else BK // 2
    NG: tl.constexpr = BK // G  # groups per K step (used only with MULTI_GROUP)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    # grouped ordering: GROUP_M row tiles walk the column tiles together (weight tiles reused from L2)
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    xrows = offs_m % M
    rows = offs_n % N
    offs_j = tl.arange(0, BKW)
    w_ptrs = QW + rows[None, :] * stride_wn + offs_j[:, None]  # [BKW, BN]
    kx = tl.arange(0, BK)  # the activations of a K step, contiguous (16-byte loads)
    if BITS == 8:
        OFFSET: tl.constexpr = 8388736.0
    else:
        OFFSET: tl.constexpr = 8388616.0
    x_ptrs = X + xrows[:, None] * stride_xm + kx[None, :]  # [BM, BK]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PER_CHANNEL:
        s_row = tl.load(S + rows * stride_sn).to(tl.float32)
        if SYMMETRIC:
            zc = tl.zeros((1, BN), dtype=tl.float32)
        else:
            zc = tl.load(Z + rows * stride_sn).to(tl.float32)[None, :]
    k_start = tl.multiple_of(pid_k * K_PER_SPLIT, BK)
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        wk = k0 if BITS == 8 else k0 // 2
        if EVEN_K:
            raw = tl.load(w_ptrs + wk)
            a = tl.load(x_ptrs + k0)
        else:
            kmask = (k0 + kx) < k_end
            if BITS == 8:
                raw = tl.load(w_ptrs + wk, mask=kmask[:, None], other=0)
            else:  # byte j holds features 2j, 2j+1: K is even (packed), so 2j < k_end masks the byte
                raw = tl.load(w_ptrs + wk, mask=((k0 + 2 * offs_j) < k_end)[:, None], other=0)
            a = tl.load(x_ptrs + k0, mask=kmask[None, :], other=0.0)
        if BITS == 8:
            a0 = a
        else:  # even and odd features (low and high nibbles), split in registers
            a0, a1 = tl.split(tl.reshape(a, (BM, BKW, 2)))
        if MULTI_GROUP:
            # a K step of BK // G groups: each weight is scaled before the dot (one bf16 rounding, as a
            # 16-bit weight has), so one dot covers the step; the group's scale and zero point are
            # broadcast over its BKW // NG rows of the tile
            sp2 = rows[None, :] * stride_sn + (k0 // G + tl.arange(0, NG))[:, None]
            s_g = _rows_of_groups(S + sp2, NG, BKW, BN)
            if SYMMETRIC:
                zc = tl.zeros((1, BN), dtype=tl.float32)
            else:
                zc = _rows_of_groups(Z + sp2, NG, BKW, BN)
        elif not PER_CHANNEL:
            gi = k0 // G
            if SYMMETRIC:
                zc = tl.zeros((1, BN), dtype=tl.float32)
            else:
                zc = tl.load(Z + rows * stride_sn + gi).to(tl.float32)[None, :]
        if BITS == 8:
            w0 = _int_to_f32(raw.to(tl.uint8, bitcast=True), 0, 0xFF, 0x80, OFFSET) - zc
        else:
            w0 = _int_to_f32(raw, 0, 0xF, 0, OFFSET) - zc
        if MULTI_GROUP:
            w0 = w0 * s_g
        if DOT_F32:
            part = tl.dot(a0.to(tl.float32), w0, input_precision="ieee")
        else:
            part = tl.dot(a0, w0.to(X.dtype.element_ty))
        if BITS == 4:
            w1 = _int_to_f32(raw, 4, 0xF, 0, OFFSET) - zc
            if MULTI_GROUP:
                w1 = w1 * s_g
            if DOT_F32:
                part += tl.dot(a1.to(tl.float32), w1, input_precision="ieee")
            else:
                part += tl.dot(a1, w1.to(X.dtype.element_ty))
        if PER_CHANNEL or MULTI_GROUP:
            acc += part
        else:
            s = tl.load(S + rows * stride_sn + gi).to(tl.float32)
            acc += part * s[None, :]
    if PER_CHANNEL:
        acc = acc * s_row[None, :]
    if HAS_BIAS:
        bias = tl.load(B + rows).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
