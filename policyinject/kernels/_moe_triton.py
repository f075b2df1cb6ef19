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

from ._quant_gemm_triton import _rows_of_groups


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
def _nibbles(b):
    """The two int4 values of each byte of ``b`` (int32 from uint8, stored ``q + 8``) as float32 ``q``:
    ``(low, high)`` -- the even and the odd feature."""
    return (b & 15).to(tl.float32) - 8.0, ((b >> 4) & 15).to(tl.float32) - 8.0


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
def _qtiles(w_base, s_base, z_base, cols_w, k0, K, NGROUPS, stride_wn, stride_sn, G,
            WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            SCALE_MODE: tl.constexpr, NG: tl.constexpr):
    """A quantized weight step for ``tl.dot``: ``[BKW, BLOCK_N]`` float32 tiles of ``(q - z) * s`` for the
    rows ``cols_w`` (already wrapped into range) over features ``k0 .. k0 + BLOCK_K`` -- the bytes loaded in
    their stored layout (``BKW = BLOCK_K`` bytes of int8, ``BLOCK_K // 2`` of int4). int8 returns the tile
    twice; int4 returns the even features' tile (low nibbles) and the odd features' (high nibbles).

    ``SCALE_MODE`` 1: the step lies inside one group (``G % BLOCK_K == 0``), one scale per row;
    2: the step holds ``NG = BLOCK_K // G`` whole groups, each group's scale broadcast over its rows of the tile
    (loaded once per row and group, not per element)."""
    BKW: tl.constexpr = BLOCK_K if WBITS == 8 else BLOCK_K // 2
    j = tl.arange(0, BKW)
    if WBITS == 8:
        kmask = (k0 + j) < K
        w0 = tl.load(w_base + cols_w[None, :] * stride_wn + (k0 + j)[:, None], mask=kmask[:, None],
                     other=0).to(tl.float32)
        w1 = w0
    else:
        kmask = (k0 + 2 * j) < K  # byte j holds features 2j and 2j + 1 (K is even)
        raw = tl.load(w_base + cols_w[None, :] * stride_wn + (k0 // 2 + j)[:, None], mask=kmask[:, None],
                      other=0).to(tl.int32)
        w0, w1 = _nibbles(raw)
    if SCALE_MODE == 1:
        g = k0 // G
        sc = tl.load(s_base + cols_w * stride_sn + g).to(tl.float32)[None, :]
        if HAS_ZERO:
            z = tl.load(z_base + cols_w * stride_sn + g).to(tl.float32)[None, :]
            w0 = w0 - z
            w1 = w1 - z
    else:
        grp = tl.minimum(k0 // G + tl.arange(0, NG), NGROUPS - 1)  # a ragged last step reads the last group
        sp = cols_w[None, :] * stride_sn + grp[:, None]
        sc = _rows_of_groups(s_base + sp, NG, BKW, BLOCK_N)
        if HAS_ZERO:
            z = _rows_of_groups(z_base + sp, NG, BKW, BLOCK_N)
            w0 = w0 - z
            w1 = w1 - z
    return w0 * sc, w1 * sc


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
        lo, hi = _nibbles(b)
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
def _qgemv_part(w_base, s_base, z_base, x_row, rows_w, k0, K, NGROUPS, stride_wn, stride_sn, G,
                WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, SCALE_MODE: tl.constexpr, NG: tl.constexpr):
    """:func:`_gemv_part` for int8/int4 weights with the scales read once per (row, group): ``SCALE_MODE``
    1: the step lies in one group (one scale and zero point per row); 2: ``NG`` whole groups per step, the
    products summed per group (``[BLOCK_N, NG, group]`` in registers) before the scale. ``rows_w`` are in
    range (wrapped by the caller), so only the K tail is masked."""
    if WBITS == 8:
        PW: tl.constexpr = BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            q = tl.load(w_base + rows_w[:, None] * stride_wn + ks[None, :]).to(tl.float32)
            xv = tl.load(x_row + ks).to(tl.float32)
        else:
            mk = ks < K
            q = tl.load(w_base + rows_w[:, None] * stride_wn + ks[None, :], mask=mk[None, :], other=0).to(tl.float32)
            xv = tl.load(x_row + ks, mask=mk, other=0.0).to(tl.float32)
    else:
        PW: tl.constexpr = BLOCK_K // 2
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        if EVEN_K:
            raw = tl.load(w_base + rows_w[:, None] * stride_wn + kb[None, :]).to(tl.int32)
            x2 = tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        else:
            raw = tl.load(w_base + rows_w[:, None] * stride_wn + kb[None, :], mask=(kb * 2 < K)[None, :],
                          other=0).to(tl.int32)
            kx = k0 + tl.arange(0, BLOCK_K)
            x2 = tl.load(x_row + kx, mask=kx < K, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x2, (BLOCK_K // 2, 2)))  # contiguous load, de-interleaved in registers
        lo, hi = _nibbles(raw)
    if SCALE_MODE == 1:
        g = k0 // G
        sc = tl.load(s_base + rows_w * stride_sn + g).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_base + rows_w * stride_sn + g).to(tl.float32)[:, None]
        if WBITS == 8:
            if HAS_ZERO:
                q = q - z
            dot = tl.sum(q * xv[None, :], axis=1)
        else:
            if HAS_ZERO:
                lo = lo - z
                hi = hi - z
            dot = tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
        return dot * sc
    else:
        gidx = tl.minimum(k0 // G + tl.arange(0, NG), NGROUPS - 1)  # a ragged last step reads the last group
        sp = rows_w[:, None] * stride_sn + gidx[None, :]
        sc = tl.load(s_base + sp).to(tl.float32)  # [BLOCK_N, NG]
        if WBITS == 8:
            q3 = tl.reshape(q, (BLOCK_N, NG, PW // NG))
            if HAS_ZERO:
                q3 = q3 - tl.load(z_base + sp).to(tl.float32)[:, :, None]
            gs = tl.sum(q3 * tl.reshape(xv, (NG, PW // NG))[None, :, :], axis=2)
        else:
            lo3 = tl.reshape(lo, (BLOCK_N, NG, PW // NG))
            hi3 = tl.reshape(hi, (BLOCK_N, NG, PW // NG))
            if HAS_ZERO:
                z3 = tl.load(z_base + sp).to(tl.float32)[:, :, None]
                lo3 = lo3 - z3
                hi3 = hi3 - z3
            gs = tl.sum(lo3 * tl.reshape(xe, (NG, PW // NG))[None, :, :]
                        + hi3 * tl.reshape(xo, (NG, PW // NG))[None, :, :], axis=2)
        return tl.sum(gs * sc, axis=1)


@triton.jit
def moe_gemv_up_kernel(
    X, W13, S13, Z13, B13, IDS, Hb, H, I, alpha, limit, G,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_hp, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
    WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, NGROUPS=1, SCALE_MODE: tl.constexpr = 0, NG: tl.constexpr = 1,
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
    if WBITS != 16 and SCALE_MODE != 0:
        rows_w = cols % I
        for k0 in range(0, H, BLOCK_K):
            if GATED:
                acc_g += _qgemv_part(w_base, s_base, z_base, x_row, rows_w, k0, H, NGROUPS, stride_wn, stride_sn, G,
                                     WBITS, HAS_ZERO, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, NG)
                acc_u += _qgemv_part(w_base, s_base, z_base, x_row, rows_w + I, k0, H, NGROUPS, stride_wn,
                                     stride_sn, G, WBITS, HAS_ZERO, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, NG)
            else:
                acc_u += _qgemv_part(w_base, s_base, z_base, x_row, rows_w, k0, H, NGROUPS, stride_wn, stride_sn, G,
                                     WBITS, HAS_ZERO, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, NG)
    else:
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
def _down_pair(Hb, W2, S2, Z2, B2, IDS, WTS, pair, cols, mask_n, H, I, G, NGROUPS,
               stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_be,
               HAS_BIAS: tl.constexpr, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SCALE_MODE: tl.constexpr, NG: tl.constexpr):
    """``w_p * (W2[e_p][cols] @ Hb[p] + b2)`` in float32 for routed pair ``p`` (zero for a pair whose expert
    is held by another rank)."""
    e = tl.load(IDS + pair).to(tl.int64)
    valid = e >= 0
    e = tl.where(valid, e, 0)
    mask_j = mask_n & valid
    wt = tl.load(WTS + pair)
    w_base = W2 + e * stride_we
    s_base = S2 + e * stride_se
    z_base = Z2 + e * stride_se
    part = tl.zeros([BLOCK_N], dtype=tl.float32)
    if WBITS != 16 and SCALE_MODE != 0:
        for k0 in range(0, I, BLOCK_K):
            part += _qgemv_part(w_base, s_base, z_base, Hb + pair * stride_hp, cols % H, k0, I, NGROUPS,
                                stride_wn, stride_sn, G, WBITS, HAS_ZERO, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, NG)
        part = tl.where(valid, part, 0.0)  # the wrapped rows were read from expert 0 for a foreign pair
    else:
        for k0 in range(0, I, BLOCK_K):
            part += _gemv_part(w_base, s_base, z_base, Hb + pair * stride_hp, cols, mask_j, k0, I, stride_wn,
                               stride_sn, G, WBITS, HAS_ZERO, BLOCK_K, EVEN_K)
    if HAS_BIAS:
        part += tl.load(B2 + e * stride_be + cols, mask=mask_j, other=0.0).to(tl.float32)
    return wt * part


@triton.jit
def moe_gemv_down_kernel(
    Hb, W2, S2, Z2, B2, IDS, WTS, OUT, H, I, G,
    stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_ot, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, NGROUPS=1, SCALE_MODE: tl.constexpr = 0,
    NG: tl.constexpr = 1, PER_PAIR: tl.constexpr = False,
):
    """Grid ``(T, cdiv(H, BLOCK_N))``: token ``t``'s ``TOPK`` experts summed in float32, one store per output
    (no atomics). ``PER_PAIR``: grid ``(T * TOPK, cdiv(H, BLOCK_N))``, each program one pair, writing the
    weighted float32 partial to ``OUT [T * TOPK, H]`` (the caller sums a token's ``TOPK`` rows): ``TOPK``
    times the programs, for a step too small to keep the chip busy otherwise."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < H
    if PER_PAIR:
        acc = _down_pair(Hb, W2, S2, Z2, B2, IDS, WTS, pid, cols, mask_n, H, I, G, NGROUPS, stride_hp, stride_we,
                         stride_wn, stride_se, stride_sn, stride_be, HAS_BIAS, WBITS, HAS_ZERO, BLOCK_N, BLOCK_K,
                         EVEN_K, SCALE_MODE, NG)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOPK):
            acc += _down_pair(Hb, W2, S2, Z2, B2, IDS, WTS, pid * TOPK + j, cols, mask_n, H, I, G, NGROUPS,
                              stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_be, HAS_BIAS, WBITS,
                              HAS_ZERO, BLOCK_N, BLOCK_K, EVEN_K, SCALE_MODE, NG)
    tl.store(OUT + pid * stride_ot + cols, acc.to(OUT.dtype.element_ty), mask=mask_n)


@triton.jit
def _rows_step(P, rows, stride, valid, k0, K, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` activation step at ``k0`` of the gathered ``rows`` (zero where not
    ``valid`` or past ``K``), float32 with ``UPCAST``."""
    ks = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(P + rows[:, None] * stride + ks[None, :], mask=valid[:, None] & (ks < K)[None, :], other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    return a


@triton.jit
def _qdot(acc, a, w0, w1, WBITS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """``acc + a @ W`` for a dequantized step from :func:`_qtiles` (int4: the even and odd activation
    columns, split in registers, against the low- and high-nibble tiles)."""
    if WBITS == 8:
        if UPCAST:
            acc += tl.dot(a, w0, input_precision="ieee")
        else:
            acc += tl.dot(a, w0.to(a.dtype))
    else:
        a0, a1 = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
        if UPCAST:
            acc += tl.dot(a0, w0, input_precision="ieee") + tl.dot(a1, w1, input_precision="ieee")
        else:
            acc += tl.dot(a0, w0.to(a.dtype)) + tl.dot(a1, w1.to(a.dtype))
    return acc


@triton.jit
def moe_gemm_up_kernel(
    X, W13, S13, Z13, B13, SORTED, BLOCK_EXPERT, Hb, H, I, alpha, limit, NPAIRS, E, G, NGROUPS,
    stride_xt, stride_we, stride_wn, stride_se, stride_sn, stride_hp, stride_be,
    TOPK: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr,
    WBITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SCALE_MODE: tl.constexpr = 0, NG: tl.constexpr = 1,
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
    if WBITS != 16 and SCALE_MODE != 0:
        cols_w = cols % I  # wrapped: every weight and scale load is in range, the store is masked
        for k0 in range(0, H, BLOCK_K):
            a = _rows_step(X, tok, stride_xt, valid, k0, H, UPCAST, BLOCK_K)
            if GATED:
                up_rows = cols_w + I  # the up rows follow the gate rows
            else:
                up_rows = cols_w
            u0, u1 = _qtiles(w_base, s_base, z_base, up_rows, k0, H, NGROUPS, stride_wn, stride_sn, G, WBITS,
                             HAS_ZERO, BLOCK_N, BLOCK_K, SCALE_MODE, NG)
            acc_u = _qdot(acc_u, a, u0, u1, WBITS, UPCAST, BLOCK_M, BLOCK_K)
            if GATED:
                g0, g1 = _qtiles(w_base, s_base, z_base, cols_w, k0, H, NGROUPS, stride_wn, stride_sn, G,
                                 WBITS, HAS_ZERO, BLOCK_N, BLOCK_K, SCALE_MODE, NG)
                acc_g = _qdot(acc_g, a, g0, g1, WBITS, UPCAST, BLOCK_M, BLOCK_K)
    else:
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
    Hb, W2, S2, Z2, B2, SORTED, BLOCK_EXPERT, WTS, Y, H, I, NPAIRS, E, G, NGROUPS,
    stride_hp, stride_we, stride_wn, stride_se, stride_sn, stride_yp, stride_be,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, WBITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_MODE: tl.constexpr = 0,
    NG: tl.constexpr = 1,
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
    if WBITS != 16 and SCALE_MODE != 0:
        cols_w = cols % H
        for k0 in range(0, I, BLOCK_K):
            a = _rows_step(Hb, rows, stride_hp, valid, k0, I, UPCAST, BLOCK_K)
            w0, w1 = _qtiles(w_base, s_base, z_base, cols_w, k0, I, NGROUPS, stride_wn, stride_sn, G, WBITS,
                             HAS_ZERO, BLOCK_N, BLOCK_K, SCALE_MODE, NG)
            acc = _qdot(acc, a, w0, w1, WBITS, UPCAST, BLOCK_M, BLOCK_K)
    else:
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


@triton.jit
def moe_route_kernel(
    LOGITS, WEIGHTS, IDS, E, stride_lt,
    TOPK: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, NORMALIZE: tl.constexpr, ROUND_BF16: tl.constexpr,
    ROUND_FP16: tl.constexpr, BLOCK_E: tl.constexpr, TOPK_P2: tl.constexpr,
):
    """One token's routing: grid ``(T,)``. ``SOFTMAX_FIRST``: softmax over all ``E`` logits in float32, the
    ``TOPK`` largest probabilities (largest first; the lowest index among equals), divided by their sum with
    ``NORMALIZE``; otherwise the ``TOPK`` largest logits, then a softmax over them. Weights (float32) are
    rounded through bf16/fp16 when the model keeps them in its own dtype; ids are int32 (a row of NaN
    logits picks in-range ids: garbage, caught by the logits' non-finite check, never an out-of-bounds read).
    ``TOPK_P2``: ``TOPK`` rounded up to a power of two (the register vector's length)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    v = tl.load(LOGITS + t * stride_lt + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        ex = tl.exp(v - tl.max(v, axis=0))
        ex = tl.where(mask, ex, 0.0)
        v = ex / tl.sum(ex, axis=0)
        v = tl.where(mask, v, -1.0)  # below every probability: padding is never chosen
    slot = tl.arange(0, TOPK_P2)
    picked_v = tl.where(slot < TOPK, 0.0, float("-inf"))  # unused slots: no weight after either softmax
    if SOFTMAX_FIRST:
        picked_v = tl.where(slot < TOPK, 0.0, 0.0)
    picked_i = tl.zeros([TOPK_P2], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        m = tl.max(v, axis=0)
        idx = tl.minimum(tl.min(tl.where(v == m, offs, BLOCK_E), axis=0), E - 1)
        picked_v = tl.where(slot == j, m, picked_v)
        picked_i = tl.where(slot == j, idx, picked_i)
        v = tl.where(offs == idx, float("-inf"), v)
    if SOFTMAX_FIRST:
        w = picked_v
        if NORMALIZE:
            w = w / tl.sum(w, axis=0)
    else:
        ex = tl.exp(picked_v - tl.max(picked_v, axis=0))
        w = ex / tl.sum(ex, axis=0)
    if ROUND_BF16:  # round to nearest even on the bits (the same on the GPU and in the interpreter)
        u = w.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        w = u.to(tl.float32, bitcast=True)
    if ROUND_FP16:
        w = w.to(tl.float16).to(tl.float32)
    tl.store(WEIGHTS + t * TOPK + slot, w, mask=slot < TOPK)
    tl.store(IDS + t * TOPK + slot, picked_i, mask=slot < TOPK)
