"""Triton kernel of the rotary family (imported lazily by :mod:`policyinject.kernels.rotary`).

Grid: ``(B * T, groups)``. Program ``(token, g)`` loads the token's cos/sin once and rotates ``BLOCK_H``
heads: groups ``[0, cdiv(Hq, BLOCK_H))`` cover q, the rest cover k, so q and k go in one launch. Each head
is two ``[BLOCK_H, BLOCK_HALF]`` tiles: ``x1 = x[..., i1]`` and ``x2 = x[..., i2]`` with ``(i1, i2) = (j, R/2 + j)``
("half" layout: two contiguous loads) or ``(2j, 2j + 1)`` ("interleaved": one contiguous load split into even
and odd lanes in registers with ``tl.reshape``/``tl.split``, joined back before one contiguous store)::

    out[i1] = x1 * cos[i1] - x2 * sin[i1]
    out[i2] = x2 * cos[i2] + x1 * sin[i2]

which is ``x * cos + rotate(x) * sin`` for either layout. Dims ``R..D`` are copied when writing to a new
tensor (``COPY_PASS``) and left alone in place. Float32 math; q/k/out/cos/sin strides are arguments (unit
stride in the last dim), so q/k may be transposed views of a projection output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    T,
    HQ,
    HKV,
    HALF,  # R / 2
    HEAD_DIM,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sqo_b,
    sqo_h,
    sqo_t,
    sko_b,
    sko_h,
    sko_t,
    sc_b,  # cos/sin batch stride (0 when shared by the batch)
    sc_t,
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    tok = tl.program_id(0)
    g = tl.program_id(1)
    bi = tok // T
    ti = tok - bi * T
    bi = bi.to(tl.int64)
    ti = ti.to(tl.int64)

    cbase = bi * sc_b + ti * sc_t
    if INTERLEAVED:
        # contiguous [2 * BLOCK_HALF] loads, split into (even, odd) in registers: 16-byte accesses
        e = tl.arange(0, 2 * BLOCK_HALF)
        emask = e < 2 * HALF
        c1, c2 = tl.split(tl.reshape(tl.load(COS + cbase + e, mask=emask, other=0.0).to(tl.float32), [BLOCK_HALF, 2]))
        s1, s2 = tl.split(tl.reshape(tl.load(SIN + cbase + e, mask=emask, other=0.0).to(tl.float32), [BLOCK_HALF, 2]))
    else:
        j = tl.arange(0, BLOCK_HALF)
        jmask = j < HALF
        c1 = tl.load(COS + cbase + j, mask=jmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + cbase + HALF + j, mask=jmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + cbase + j, mask=jmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + cbase + HALF + j, mask=jmask, other=0.0).to(tl.float32)

    nq = tl.cdiv(HQ, BLOCK_H)
    if g < nq:
        X = Q
        XO = QO
        h0 = g * BLOCK_H
        H = HQ
        in_base = bi * sq_b + ti * sq_t
        out_base = bi * sqo_b + ti * sqo_t
        s_h = sq_h
        so_h = sqo_h
    else:
        X = K
        XO = KO
        h0 = (g - nq) * BLOCK_H
        H = HKV
        in_base = bi * sk_b + ti * sk_t
        out_base = bi * sko_b + ti * sko_t
        s_h = sk_h
        so_h = sko_h

    h = h0 + tl.arange(0, BLOCK_H)
    hmask = h < H
    h64 = h.to(tl.int64)
    in_rows = X + in_base + h64 * s_h
    out_rows = XO + out_base + h64 * so_h
    if INTERLEAVED:
        mask = hmask[:, None] & emask[None, :]
        x = tl.load(in_rows[:, None] + e[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_HALF, 2]))
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        o = tl.reshape(tl.join(o1, o2), [BLOCK_H, 2 * BLOCK_HALF])
        tl.store(out_rows[:, None] + e[None, :], o.to(XO.dtype.element_ty), mask=mask)
    else:
        mask = hmask[:, None] & jmask[None, :]
        x1 = tl.load(in_rows[:, None] + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_rows[:, None] + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(out_rows[:, None] + j[None, :], o1.to(XO.dtype.element_ty), mask=mask)
        tl.store(out_rows[:, None] + HALF + j[None, :], o2.to(XO.dtype.element_ty), mask=mask)

    if COPY_PASS:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = hmask[:, None] & (p < HEAD_DIM)[None, :]
        xp = tl.load(in_rows[:, None] + p[None, :], mask=pmask, other=0.0)
        tl.store(out_rows[:, None] + p[None, :], xp, mask=pmask)
