"""Triton kernels of the quantized decode GEMVs (:mod:`policyinject.kernels.quant_matmul`), in-register
dequantization of int8/int4 weights, float32 accumulation:

* ``_qgemv_kernel``: the byte GEMV for ``M <= 4`` rows; each program streams ``BN`` weight rows in K steps of
  ``GPB`` groups of ``GK`` values, one 3-D tile ``[BN, GPB, GK]`` (bytes of one row contiguous, 16-byte
  loads), multiplies by the activation row(s) and accumulates elementwise; the group scale multiplies the
  product (per output channel: once, at the end). K is split over programs (``split_k``, float32 atomics)
  when the rows alone do not fill the GPU.
* ``_q8gemv_kernel``: int8 with one scale per output channel, the tile in the activation load's layout.
* ``_q4gemv_kernel``: int4 on packed int32 words, unpacked with shifts and AND-ORs.

Integers become floats with the exponent trick (``float_bits(0x4B000000 | u) - 2^23 == u`` for ``u < 2^23``),
an integer OR and a float add instead of the slower int->float conversion unit (``_int_to_f32``, also used by
the tl.dot kernel in :mod:`._quant_gemm_triton`).

A Triton-only module, imported through :func:`~policyinject.kernels._common.load_kernel_module` on the Triton
path only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemv_epilogue_triton import load_act, store_gated, store_tile, tile_rows


@triton.jit
def _int_to_f32(u, SHIFT: tl.constexpr, MASK: tl.constexpr, XOR: tl.constexpr, OFFSET: tl.constexpr):
    """((u >> SHIFT) & MASK ^ XOR) as float32 minus OFFSET, through the exponent trick."""
    v = u.to(tl.uint32)
    if SHIFT > 0:
        v = v >> SHIFT
    v = ((v & MASK) ^ XOR) | 0x4B000000
    return v.to(tl.float32, bitcast=True) - OFFSET

@triton.jit
def _load_x(xp, kxf, k0, k_end, EVEN_K: tl.constexpr, BITS: tl.constexpr, GPB: tl.constexpr,
            GKW: tl.constexpr):
    """One activation row's K step as float32 ``[GPB, GKW]``; for int4 split into (even, odd) elements,
    loaded contiguously (16-byte loads) and de-interleaved in registers."""
    if EVEN_K:
        x = tl.load(xp + kxf).to(tl.float32)
    else:
        x = tl.load(xp + kxf, mask=(k0 + kxf) < k_end, other=0.0).to(tl.float32)
    if BITS == 8:
        return x, x
    else:
        return tl.split(tl.reshape(x, (GPB, GKW, 2)))

@triton.jit
def _qgemv_kernel(
    X, QW, S, Z, B, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    ROWS: tl.constexpr,
    BN: tl.constexpr,
    GPB: tl.constexpr,
    GK: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    BK: tl.constexpr = GPB * GK
    GKW: tl.constexpr = GK if BITS == 8 else GK // 2  # stored bytes per sub-block row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_n % N  # clamped: out-of-range rows compute garbage that is never stored
    offs_g = tl.arange(0, GPB)
    offs_j = tl.arange(0, GKW)
    # byte offset of each tile element inside one K step, [1, GPB, GKW]
    tile = offs_g[:, None] * GKW + offs_j[None, :]
    w_ptrs = QW + rows[:, None, None] * stride_wn + tile[None, :, :]
    if BITS == 8:
        kx = tile  # element index inside the step
        kxf = tile
    else:
        kx = offs_g[:, None] * GK + 2 * offs_j[None, :]  # even element of each byte (weight mask)
        kxf = offs_g[:, None] * GK + tl.arange(0, GK)[None, :]  # every element: contiguous x loads
    acc3 = tl.zeros((BN, GPB, GKW), dtype=tl.float32)
    acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    if BITS == 8:
        OFFSET: tl.constexpr = 8388736.0  # 2^23 + 128: stored int8 q as (q ^ 0x80) = q + 128
    else:
        OFFSET: tl.constexpr = 8388616.0  # 2^23 + 8: nibbles hold q + 8
    if PER_CHANNEL:
        s_row = tl.load(S + rows * stride_sn).to(tl.float32)
        if SYMMETRIC:
            zc = tl.zeros((BN, 1, 1), dtype=tl.float32)
        else:
            zc = tl.load(Z + rows * stride_sn).to(tl.float32)[:, None, None]
    k_start = tl.multiple_of(pid_k * K_PER_SPLIT, BK)
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        wk = k0 if BITS == 8 else k0 // 2
        if EVEN_K:
            raw = tl.load(w_ptrs + wk, eviction_policy="evict_first")
        else:
            kmask = (k0 + kx) < k_end
            raw = tl.load(w_ptrs + wk, mask=kmask[None, :, :], other=0, eviction_policy="evict_first")
        if not PER_CHANNEL:
            gidx = (k0 + offs_g * GK) // G
            s = tl.load(S + rows[:, None] * stride_sn + gidx[None, :]).to(tl.float32)[:, :, None]
            if SYMMETRIC:
                zc = tl.zeros((BN, GPB, 1), dtype=tl.float32)
            else:
                zc = tl.load(Z + rows[:, None] * stride_sn + gidx[None, :]).to(tl.float32)[:, :, None]
        if BITS == 8:
            u = raw.to(tl.uint8, bitcast=True)
            w0 = _int_to_f32(u, 0, 0xFF, 0x80, OFFSET) - zc
            w1 = w0  # unused
        else:
            w0 = _int_to_f32(raw, 0, 0xF, 0, OFFSET) - zc
            w1 = _int_to_f32(raw, 4, 0xF, 0, OFFSET) - zc
        if not PER_CHANNEL:
            w0 = w0 * s
            if BITS == 4:
                w1 = w1 * s
        if BM == 1:
            x0, x1 = _load_x(X + k0, kxf, k0, k_end, EVEN_K, BITS, GPB, GKW)
            if BITS == 8:
                acc3 += w0 * x0[None, :, :]
            else:
                acc3 += w0 * x0[None, :, :] + w1 * x1[None, :, :]
        else:
            for m in tl.static_range(ROWS):
                x0, x1 = _load_x(X + m * stride_xm + k0, kxf, k0, k_end, EVEN_K, BITS, GPB, GKW)
                prod = w0 * x0[None, :, :]
                if BITS == 4:
                    prod += w1 * x1[None, :, :]
                part = tl.sum(tl.sum(prod, axis=2), axis=1)
                acc_t += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
    if BM == 1:
        acc_t = tl.sum(tl.sum(acc3, axis=2), axis=1)[:, None]
    if PER_CHANNEL:
        acc_t = acc_t * s_row[:, None]
    store_tile(Y, acc_t, B, rows, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)

@triton.jit
def _bytes_to_f32(raw, ASM: tl.constexpr):
    """Each signed byte ``q`` of ``raw`` (int8) as the float32 ``2^23 + 128 + q``, exact.

    ``ASM=True``: four bytes at a time in one ``xor`` (offset binary: ``q ^ 0x80 = q + 128``) and one
    ``prmt`` per byte that writes the byte under the exponent of ``2^23`` (``0x4B0000uu``), so a weight
    costs that ``prmt``, the caller's subtract and its FMA. Left to itself the compiler gathered the
    bytes of four rows into words and extracted them again (six instructions per weight, H100 SASS).
    ``ASM=False`` (the interpreter): the same value through :func:`_int_to_f32`."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $4, 0x80808080;"
            " prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541;"
            " prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [raw], dtype=tl.float32, is_pure=True, pack=4)
    return _int_to_f32(raw.to(tl.uint8, bitcast=True), 0, 0xFF, 0x80, 0.0)

@triton.jit
def _q8gemv_kernel(
    X, QW, S, Z, B, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym,
    SYMMETRIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    ROWS: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    VEC: tl.constexpr,
    ASM: tl.constexpr = False,
    GATED: tl.constexpr = False,
):
    """int8 per-output-channel decode GEMV on a ``[BN, BK // VEC, VEC]`` tile of each step: ``VEC`` (8 or
    16) bytes of a row per thread and load, the activations loaded in the same layout, so nothing is
    exchanged through shared memory in the loop (``_qgemv_kernel``'s 16-byte weight loads make it
    reshuffle the activations every step). Each thread sums its ``VEC`` products in registers (one
    accumulator per ``VEC`` weights: fewer registers, more programs and bytes in flight per SM). The
    zero point folds into the exponent-trick offset (``2^23 + 128 + z`` is exact in float32), so
    asymmetric weights cost nothing extra; the scale multiplies the row sums once. ``GATED``: a fused
    gate|up weight of ``2 N`` rows, SwiGLU in the epilogue (``_gemv_epilogue_triton.tile_rows``)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    rows = tile_rows(pid_n, N, BN, GATED)
    w_ptrs = QW + rows[:, None, None] * stride_wn + offs_k[None, :, :]
    if SYMMETRIC:
        off = tl.full((BN, 1, 1), 8388736.0, tl.float32)  # 2^23 + 128: the stored byte is q ^ 0x80 = q + 128
    else:
        off = 8388736.0 + tl.load(Z + rows * stride_sn).to(tl.float32)[:, None, None]
    # the scales are loaded before the loop (measured neutral against after it: H100, session 4 run 10)
    scale = tl.load(S + rows * stride_sn).to(tl.float32)
    acc2 = tl.zeros((BN, BK // VEC), dtype=tl.float32)
    acc_t = tl.zeros((BN, BM), dtype=tl.float32)
    k_start = tl.multiple_of(pid_k * K_PER_SPLIT, BK)
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        kk = k0 + offs_k
        if EVEN_K:
            raw = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            raw = tl.load(w_ptrs + k0, mask=(kk < k_end)[None, :, :], other=0, eviction_policy="evict_first")
        w = _bytes_to_f32(raw, ASM) - off
        if BM == 1:
            # each thread's VEC products summed in registers: one accumulator per VEC weights
            acc2 += tl.sum(w * load_act(X + kk, kk, k_end, EVEN_K)[None, :, :], axis=2)
        else:
            for m in tl.static_range(ROWS):
                xm = load_act(X + m * stride_xm + kk, kk, k_end, EVEN_K)
                part = tl.sum(tl.sum(w * xm[None, :, :], axis=2), axis=1)
                acc_t += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
    if GATED:
        store_gated(Y, tl.sum(acc2, axis=1) * scale, B, rows, pid_n, N, HAS_BIAS, BN)
    else:
        if BM == 1:
            acc_t = tl.sum(acc2, axis=1)[:, None]
        store_tile(Y, acc_t * scale[:, None], B, rows, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS,
                   SPLIT_K)

@triton.jit
def _split8(x, GPB: tl.constexpr, WG: tl.constexpr):
    """``x`` of shape ``[GPB, WG * 8]`` as the 8 tensors ``x[:, 8 * w + i]`` (``i = 0..7``), each
    ``[GPB, WG]``: the activation values met by nibble ``i`` of each packed int32 word."""
    x5 = tl.reshape(x, (GPB, WG, 2, 2, 2))  # last three dims: bits 2, 1, 0 of i
    e, o = tl.split(x5)  # i even / odd
    e0, e1 = tl.split(e)
    o0, o1 = tl.split(o)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5_ = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5_, x6, x7

@triton.jit
def _nib(t, MASK: tl.constexpr, ASM: tl.constexpr):
    """Bits ``MASK`` (four bits at 12..15 or 16..19) of ``t`` as the float ``1 + u * 2^(p - 23)``: one
    AND-OR (``lop3``, written out: ptxas emits two LOP3 for ``(t & m) | c`` with two immediates) and no
    conversion instruction. ``ASM=False`` (the interpreter) computes the same with plain integer ops."""
    if ASM:
        if MASK == 0x000F0000:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F0000, 0x3F800000, 0xEA;", "=r,r", [t],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x0000F000, 0x3F800000, 0xEA;", "=r,r", [t],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        v = (t & MASK) | 0x3F800000
    return v.to(tl.float32, bitcast=True)

@triton.jit
def _q4_row_part(w, x0, x1, x2, x3, x4, x5, x6, x7, corr, ASM: tl.constexpr):
    """``sum_i (u_i - 8) * x_i`` per packed word for one activation row (``corr`` holds the offsets).

    Nibble ``i`` of word ``w`` is feature ``8w + i``. It is moved (one shift for two nibbles) to bits 16..19
    (value ``1 + u/128``) or 12..15 (``1 + u/2048``); the activations come pre-multiplied by 128 or 2048,
    so ``v_i * x'_i = x'_i + u_i * x_i`` and ``corr = sum_i x'_i + 8 * x_i`` removes the constant part."""
    HI: tl.constexpr = 0x000F0000
    LO: tl.constexpr = 0x0000F000
    a = w << 16  # nibble 0 -> 16..19
    b = w << 8  # nibble 1 -> 12..15, nibble 2 -> 16..19
    c = w >> 8  # nibble 5 -> 12..15, nibble 6 -> 16..19
    d = w >> 12  # nibble 7 -> 16..19
    part = -corr
    part += _nib(a, HI, ASM) * x0
    part += _nib(b, LO, ASM) * x1
    part += _nib(b, HI, ASM) * x2
    part += _nib(w, LO, ASM) * x3
    part += _nib(w, HI, ASM) * x4
    part += _nib(c, LO, ASM) * x5
    part += _nib(c, HI, ASM) * x6
    part += _nib(d, HI, ASM) * x7
    return part

@triton.jit
def _q4_load_x(xp, xt, kx0, K, EVEN_K: tl.constexpr, GPB: tl.constexpr, WG: tl.constexpr):
    """One activation row's K step: the 8 per-nibble tensors, pre-multiplied by 128 (nibbles moved to
    bits 16..19) or 2048 (bits 12..15), and the correction ``sum_i x'_i + 8 x_i`` per word, plus the plain
    sum (for zero points)."""
    if EVEN_K:
        x = tl.load(xp + xt).to(tl.float32)
    else:
        x = tl.load(xp + xt, mask=(kx0 + xt) < K, other=0.0).to(tl.float32)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x, GPB, WG)
    xsum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    hi = (x0 + x2) + (x4 + (x6 + x7))
    lo = x1 + x3 + x5
    corr = hi * 136.0 + lo * 2056.0
    return (x0 * 128.0, x1 * 2048.0, x2 * 128.0, x3 * 2048.0, x4 * 128.0, x5 * 2048.0, x6 * 128.0,
            x7 * 128.0, corr, xsum)

@triton.jit(do_not_specialize=["ONE"])
def _q4gemv_kernel(
    X, QW, S, Z, B, Y,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_ym, ONE,
    SYMMETRIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    ROWS: tl.constexpr,
    BN: tl.constexpr,
    GPB: tl.constexpr,
    WG: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,
    WORD_LOADS: tl.constexpr,
):
    """int4 decode GEMV on packed int32 words (``QW`` is the uint8 weight viewed as int32, ``stride_wn``
    in words): 16-byte loads of 32 nibbles, unpacked with shifts and AND-ORs into floats (no conversion
    instructions), one FMA per weight, the group scale applied once per word and row (one FMA), not per
    weight. A K step is ``GPB`` sub-blocks of ``WG`` words (``8 * WG`` features, dividing the group)."""
    GK: tl.constexpr = WG * 8
    BK: tl.constexpr = GPB * GK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_n % N
    offs_g = tl.arange(0, GPB)
    wt = offs_g[:, None] * WG + tl.arange(0, WG)[None, :]  # word index inside the step [GPB, WG]
    if WORD_LOADS:
        # one 4-byte word per thread and row: the words' layout then matches the activations' 16-byte
        # loads (8 values per word) and needs no shared-memory exchange (ONE == 1 at run time, unknown
        # to the compiler, so the word offsets are not seen as contiguous)
        w_ptrs = QW + rows[:, None, None] * stride_wn + (wt * ONE)[None, :, :]
    else:
        w_ptrs = QW + rows[:, None, None] * stride_wn + wt[None, :, :]
    xt = offs_g[:, None] * GK + tl.arange(0, GK)[None, :]  # feature index inside the step [GPB, GK]
    acc0 = tl.zeros((BN, GPB, WG), dtype=tl.float32)
    acc1 = tl.zeros((BN, GPB, WG), dtype=tl.float32)
    acc2 = tl.zeros((BN, GPB, WG), dtype=tl.float32)
    acc3 = tl.zeros((BN, GPB, WG), dtype=tl.float32)
    k_start = tl.multiple_of(pid_k * K_PER_SPLIT, BK)
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        if EVEN_K:
            w = tl.load(w_ptrs + k0 // 8, eviction_policy="evict_first")
        else:
            wmask = (k0 + wt * 8) < k_end
            w = tl.load(w_ptrs + k0 // 8, mask=wmask[None, :, :], other=0, eviction_policy="evict_first")
        if PER_CHANNEL:
            s = tl.full((BN, GPB, 1), 1.0, tl.float32)
        else:
            gidx = (k0 + offs_g * GK) // G
            sp = rows[:, None] * stride_sn + gidx[None, :]
            s2 = tl.load(S + sp).to(tl.float32)
            s = s2[:, :, None]
            if not SYMMETRIC:
                zs = (tl.load(Z + sp).to(tl.float32) * s2)[:, :, None]
        for m in tl.static_range(ROWS):
            x0, x1, x2, x3, x4, x5, x6, x7, corr, xsum = _q4_load_x(
                X + m * stride_xm + k0, xt, k0, k_end, EVEN_K, GPB, WG)
            part = _q4_row_part(w, x0, x1, x2, x3, x4, x5, x6, x7, corr[None, :, :], ASM)
            if PER_CHANNEL:
                contrib = part
            else:
                contrib = part * s
            if not SYMMETRIC:
                if PER_CHANNEL:
                    zc = tl.load(Z + rows * stride_sn).to(tl.float32)[:, None, None]
                    contrib -= zc * xsum[None, :, :]
                else:
                    contrib -= zs * xsum[None, :, :]
            if m == 0:
                acc0 += contrib
            elif m == 1:
                acc1 += contrib
            elif m == 2:
                acc2 += contrib
            else:
                acc3 += contrib
    y0 = tl.sum(tl.sum(acc0, axis=2), axis=1)
    acc_t = tl.where(offs_m[None, :] == 0, y0[:, None], 0.0)
    if ROWS > 1:
        acc_t += tl.where(offs_m[None, :] == 1, tl.sum(tl.sum(acc1, axis=2), axis=1)[:, None], 0.0)
    if ROWS > 2:
        acc_t += tl.where(offs_m[None, :] == 2, tl.sum(tl.sum(acc2, axis=2), axis=1)[:, None], 0.0)
    if ROWS > 3:
        acc_t += tl.where(offs_m[None, :] == 3, tl.sum(tl.sum(acc3, axis=2), axis=1)[:, None], 0.0)
    if PER_CHANNEL:
        acc_t = acc_t * tl.load(S + rows * stride_sn).to(tl.float32)[:, None]
    store_tile(Y, acc_t, B, rows, offs_m, offs_n, M, N, stride_ym, pid_k, HAS_BIAS, SPLIT_K)
