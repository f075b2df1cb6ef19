"""Triton kernels of the fused MoE family (imported lazily by :mod:`policyinject.kernels.moe`).

Layouts: ``X [T, H]``, ``W13 [E, 2I, H]`` (gate rows then up rows; ``[E, I, H]`` plain), ``W2 [E, H, I]``,
``B13 [E, 2I]``, ``B2 [E, H]``, routed pairs ``p = t * TOPK + j`` with expert ``IDS[p]`` and weight ``WTS[p]``
(float32). Activations (``ACT``): 0 SiLU, 1 GELU tanh, 2 GELU erf, 3 ReLU, 4 GPT-OSS clamped SwiGLU
(``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``).

Decode (few tokens):

- ``moe_gemv_up_kernel``: grid ``(T * TOPK, cdiv(I, BLOCK_N))``; each program streams ``BLOCK_N`` gate rows
  and the matching up rows of its pair's expert once, applies the activation and writes ``Hb[p, :]``;
- ``moe_gemv_down_kernel``: grid ``(T, cdiv(H, BLOCK_N))``; for each of the token's ``TOPK`` experts, the
  down rows times ``Hb[p]``, weighted and summed in float32 -- one store per output element, no atomics.

Prefill (tokens sorted by expert, :func:`policyinject.kernels.moe.align_tokens`):

- ``moe_gemm_up_kernel``: grid ``(max_blocks, cdiv(I, BLOCK_N))``; a ``BLOCK_M`` block of sorted pairs of
  one expert gathers its token rows and runs ``tl.dot`` against the expert's gate and up tiles;
- ``moe_gemm_down_kernel``: same grid over ``H``; writes ``Y[p, :] = w_p * (Hb[p] @ W2[e].T + b2)`` in
  float32; the caller sums the ``TOPK`` rows of each token.

Expert weights (``WBITS``): 16 (float, as stored), 8 (int8) or 4 (int4, two per byte) in the format of
:mod:`policyinject.kernels.quantize`, stacked per expert: ``S``/``Z`` ``[E, rows, K // G]``; each tile is
dequantized to float32 in registers (:func:`_wload`), so only the quantized bytes travel from memory.

Blocks past the used ones (``BLOCK_EXPERT == E``) and padding rows (``SORTED == T * TOPK``) do nothing.
``UPCAST``: operands are converted to float32 before ``tl.dot`` (fp32 inputs, and the interpreter, whose
bf16 arithmetic is wrong); otherwise the dot runs on the 16-bit operands with a float32 accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(g, u, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    if ACT == 4:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(g * alpha))
    if GATED:
        v = g
    else:
        v = u
    if ACT == 0:
        a = v * tl.sigmoid(v)
    elif ACT == 1:
        a = v * tl.sigmoid(2.0 * (0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 2:
        a = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    else:
        a = tl.maximum(v, 0.0)
    if GATED:
        a = a * u
    return a


@triton.jit
def _wload(W, S, Z, r2, k2, m2, stride_wn, stride_sn, G, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """A float32 weight tile at rows ``r2``, input features ``k2`` (broadcast 2-D offsets), dequantized:
    16-bit floats as they are; int8 ``W[r, k]``; int4 two per byte (``k`` even: low nibble), stored ``q + 8``;
    then ``(q - Z[r, k // G]) * S[r, k // G]``."""
    if WBITS == 16:
        return tl.load(W + r2 * stride_wn + k2, mask=m2, other=0.0).to(tl.float32)
    if WBITS == 8:
        q = tl.load(W + r2 * stride_wn + k2, mask=m2, other=0).to(tl.float32)
    else:
        b = tl.load(W + r2 * stride_wn + k2 // 2, mask=m2, other=0).to(tl.int32)
        q = tl.where(k2 % 2 == 0, b & 15, b >> 4).to(tl.float32) - 8.0
    grp = k2 // G
    sc = tl.load(S + r2 * stride_sn + grp, mask=m2, other=0.0).to(tl.float32)
    if HAS_ZERO:
        q = q - tl.load(Z + r2 * stride_sn + grp, mask=m2, other=0.0).to(tl.float32)
    return q * sc


@triton.jit
def _gemv_part(w_base, s_base, z_base, x_row, rows, mask_n, k0, K, stride_wn, stride_sn, G,
               WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """``sum_k W[rows, k] * x[k]`` over ``k0 .. k0 + BLOCK_K`` (float32 ``[BLOCK_N]``). int4 reads whole bytes
    (``BLOCK_K / 2`` per row, vectorised) and multiplies the low nibbles with the even ``x`` and the high
    nibbles with the odd ``x``. ``EVEN_K``: ``K`` is a multiple of ``BLOCK_K`` (no mask along K, so the
    compiler can prove 16-byte loads)."""
    if WBITS == 4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            m2 = mask_n[:, None]
            xe = tl.load(x_row + kb * 2).to(tl.float32)
            xo = tl.load(x_row + kb * 2 + 1).to(tl.float32)
        else:
            mk = kb * 2 < K
            m2 = mask_n[:, None] & mk[None, :]
            xe = tl.load(x_row + kb * 2, mask=mk, other=0.0).to(tl.float32)
            xo = tl.load(x_row + kb * 2 + 1, mask=mk, other=0.0).to(tl.float32)
        b = tl.load(w_base + rows[:, None] * stride_wn + kb[None, :], mask=m2, other=0).to(tl.int32)
        lo = (b & 15).to(tl.float32) - 8.0
        hi = (b >> 4).to(tl.float32) - 8.0
        grp = (kb * 2 // G)[None, :]
        sc = tl.load(s_base + rows[:, None] * stride_sn + grp, mask=m2, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_base + rows[:, None] * stride_sn + grp, mask=m2, other=0.0).to(tl.float32)
            lo = lo - z
            hi = hi - z
        return tl.sum((lo * xe[None, :] + hi * xo[None, :]) * sc, axis=1)
    ks = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        m2 = mask_n[:, None]
        xv = tl.load(x_row + ks).to(tl.float32)
    else:
        mk = ks < K
        m2 = mask_n[:, None] & mk[None, :]
        xv = tl.load(x_row + ks, mask=mk, other=0.0).to(tl.float32)
    w = _wload(w_base, s_base, z_base, rows[:, None], ks[None, :], m2, stride_wn, stride_sn, G, WBITS, HAS_ZERO)
    return tl.sum(w * xv[None, :], axis=1)


@triton.jit
def moe_gemv_up_kernel(
    X, W13, S13, Z13, B13, IDS, Hb, H, I, alpha, limit, G,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_hp, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
    WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(IDS + pair).to(tl.int64)
    valid = e >= 0  # a negative id: an expert held by another rank (expert parallelism) -- h is zero
    e = tl.where(valid, e, 0)
    t = (pair // TOPK).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_out = cols < I
    mask_n = mask_out & valid
    w_base = W13 + e * stride_we
    s_base = S13 + e * stride_se
    z_base = Z13 + e * stride_se
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = X + t * stride_xt
    for k0 in range(0, H, BLOCK_K):
        if GATED:
            acc_g += _gemv_part(w_base, s_base, z_base, x_row, cols, mask_n, k0, H, stride_wn, stride_sn, G, WBITS,
                                HAS_ZERO, BLOCK_K, EVEN_K)
            acc_u += _gemv_part(w_base, s_base, z_base, x_row, cols + I, mask_n, k0, H, stride_wn, stride_sn, G,
                                WBITS, HAS_ZERO, BLOCK_K, EVEN_K)
        else:
            acc_u += _gemv_part(w_base, s_base, z_base, x_row, cols, mask_n, k0, H, stride_wn, stride_sn, G, WBITS,
                                HAS_ZERO, BLOCK_K, EVEN_K)
    if HAS_BIAS:
        if GATED:
            acc_g += tl.load(B13 + e * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)
            acc_u += tl.load(B13 + e * stride_be + I + cols, mask=mask_n, other=0.0).to(tl.float32)
        else:
            acc_u += tl.load(B13 + e * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)
    a = _act(acc_g, acc_u, alpha, limit, ACT, GATED)
    a = tl.where(valid, a, 0.0)
    tl.store(Hb + pair.to(tl.int64) * stride_hp + cols, a.to(Hb.dtype.element_ty), mask=mask_out)


@triton.jit
def moe_gemv_down_kernel(
    Hb, W2, S2, Z2, B2, IDS, WTS, OUT, H, I, G,
    stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_ot, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pair = t * TOPK + j
        e = tl.load(IDS + pair).to(tl.int64)
        valid = e >= 0
        e = tl.where(valid, e, 0)
        mask_j = mask_n & valid
        wt = tl.load(WTS + pair)
        w_base = W2 + e * stride_we
        s_base = S2 + e * stride_se
        z_base = Z2 + e * stride_se
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            part += _gemv_part(w_base, s_base, z_base, Hb + pair * stride_hp, cols, mask_j, k0, I, stride_wn,
                               stride_sn, G, WBITS, HAS_ZERO, BLOCK_K, EVEN_K)
        if HAS_BIAS:
            part += tl.load(B2 + e * stride_be + cols, mask=mask_j, other=0.0).to(tl.float32)
        acc += wt * part
    tl.store(OUT + t * stride_ot + cols, acc.to(OUT.dtype.element_ty), mask=mask_n)


@triton.jit
def moe_gemm_up_kernel(
    X, W13, S13, Z13, B13, SORTED, BLOCK_EXPERT, Hb, H, I, alpha, limit, NPAIRS, E, G,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_hp, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
    WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e >= E:
        return
    e = e.to(tl.int64)
    pairs = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < NPAIRS
    tok = (pairs // TOPK).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < I
    w_base = W13 + e * stride_we
    s_base = S13 + e * stride_se
    z_base = Z13 + e * stride_se
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < H
        a = tl.load(X + tok[:, None] * stride_xt + ks[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        mb = mask_k[:, None] & mask_n[None, :]
        if GATED:
            bu = _wload(w_base, s_base, z_base, (cols + I)[None, :], ks[:, None], mb, stride_wn, stride_sn, G, WBITS,
                        HAS_ZERO)
        else:
            bu = _wload(w_base, s_base, z_base, cols[None, :], ks[:, None], mb, stride_wn, stride_sn, G, WBITS,
                        HAS_ZERO)
        if UPCAST:
            a = a.to(tl.float32)
            acc_u += tl.dot(a, bu, input_precision="ieee")
        else:
            acc_u += tl.dot(a, bu.to(a.dtype))
        if GATED:
            bg = _wload(w_base, s_base, z_base, cols[None, :], ks[:, None], mb, stride_wn, stride_sn, G, WBITS,
                        HAS_ZERO)
            if UPCAST:
                acc_g += tl.dot(a, bg, input_precision="ieee")
            else:
                acc_g += tl.dot(a, bg.to(a.dtype))
    if HAS_BIAS:
        if GATED:
            acc_g += tl.load(B13 + e * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(B13 + e * stride_be + I + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            acc_u += tl.load(B13 + e * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    act = _act(acc_g, acc_u, alpha, limit, ACT, GATED)
    rows = pairs.to(tl.int64)
    tl.store(Hb + rows[:, None] * stride_hp + cols[None, :], act.to(Hb.dtype.element_ty),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def moe_gemm_down_kernel(
    Hb, W2, S2, Z2, B2, SORTED, BLOCK_EXPERT, WTS, Y, H, I, NPAIRS, E, G,
    stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_yp, stride_be,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e >= E:
        return
    e = e.to(tl.int64)
    pairs = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < NPAIRS
    rows = pairs.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < H
    w_base = W2 + e * stride_we
    s_base = S2 + e * stride_se
    z_base = Z2 + e * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < I
        a = tl.load(Hb + rows[:, None] * stride_hp + ks[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = _wload(w_base, s_base, z_base, cols[None, :], ks[:, None], mask_k[:, None] & mask_n[None, :],
                   stride_wn, stride_sn, G, WBITS, HAS_ZERO)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), b, input_precision="ieee")
        else:
            acc += tl.dot(a, b.to(a.dtype))
    if HAS_BIAS:
        acc += tl.load(B2 + e * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    wt = tl.load(WTS + pairs, mask=valid, other=0.0)
    acc = acc * wt[:, None]
    tl.store(Y + rows[:, None] * stride_yp + cols[None, :], acc, mask=valid[:, None] & mask_n[None, :])
