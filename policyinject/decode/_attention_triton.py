"""Triton kernels of one decode step's attention over the static KV cache (see ``attention.py``).

Split-KV ("flash-decoding"): :func:`decode_attention_kernel` runs on a grid ``(B * HKV, NSPLIT)``. Program
``(row, kv head, split)`` takes the ``G`` query heads that share the KV head at once (padded to ``G_PAD`` >= 16
rows for ``tl.dot``; float32 caches use IEEE float32 products, not TF32; K/V are never repeated) and runs an
online softmax over its share of the valid slots. The slots attended are ``[lo, end)`` with
``end = min(cache_pos, span)`` and ``lo = 0`` (or ``cache_pos - window + 1`` with a sliding window); both are
computed on the device from ``cache_pos``, and so is the chunk of each split
(``cdiv(cdiv(end - lo, NSPLIT), BLOCK_S) * BLOCK_S`` slots), so the grid is static and one CUDA graph replays
the launch at every position; splits whose chunk starts at or past ``end`` write an empty partial. Split 0
(only) also writes the new k/v into cache slot ``cache_pos`` and includes the new token from registers. With
``R > 0`` the rotary embedding of q (every split) and the new k (split 0) is applied first.

Within a block of ``BLOCK_S`` slots the K, V and mask loads are independent of each other (masked slots are
zeroed after the load, not by a load predicate that waits for the mask), so one memory round trip serves a
block. Each split writes its partial ``(m, l, acc)`` in float32 (``PM``/``PL [B*HQ, NSPLIT]``,
``PACC [B*HQ, NSPLIT, D]``) and :func:`decode_attention_combine_kernel` (a second launch, one program per
query head) combines them in split order (deterministic): ``m = max m_j; l = sum l_j e^(m_j - m);
out = sum acc_j e^(m_j - m) / l``.

:func:`decode_attention_single_kernel` is the kernel before the split, one program per (row, KV head) that
loops over all its slots and writes the output itself: the launcher uses it when ``B * HKV`` programs already
fill the GPU (batch >= 4-8 with 8 KV heads), where one split of the split kernel measured slower
(``benchmarks/NOTES.md``, attention runs).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: running max of a split that has seen no slot yet (finite, so an all-masked block gives no inf - inf)
_EMPTY_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _rotary_coeffs(COS, SIN, row, offs_d, R: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Per-dimension rotary terms for one position: ``out[d] = x[d] c[d] + x[partner[d]] sn[d]`` for d < R."""
    r_ok = offs_d < R
    if INTERLEAVED:
        partner = offs_d ^ 1
        sign = tl.where((offs_d % 2) == 0, -1.0, 1.0)
    else:
        partner = tl.where(offs_d < R // 2, offs_d + R // 2, offs_d - R // 2)
        sign = tl.where(offs_d < R // 2, -1.0, 1.0)
    c = tl.load(COS + row + offs_d, mask=r_ok, other=1.0).to(tl.float32)
    sn = tl.load(SIN + row + offs_d, mask=r_ok, other=0.0).to(tl.float32) * sign
    return r_ok, partner, c, sn


@triton.jit
def _rotate_rows(X, x, row_offs, row_ok, partner, r_ok, c, sn):
    """Rotate the ``[rows, D_PAD]`` tile ``x`` loaded from ``X + row_offs[:, None] + d`` (d < R only)."""
    x_p = tl.load(X + row_offs[:, None] + partner[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    x_rot = x.to(tl.float32) * c[None, :] + x_p.to(tl.float32) * sn[None, :]
    return tl.where(r_ok[None, :], x_rot.to(x.dtype), x)


@triton.jit
def _rotate_vec(X, x, partner, r_ok, c, sn):
    """Rotate the vector ``x`` loaded from ``X + d`` (d < R only)."""
    x_p = tl.load(X + partner, mask=r_ok, other=0.0)
    x_rot = x.to(tl.float32) * c + x_p.to(tl.float32) * sn
    return tl.where(r_ok, x_rot.to(x.dtype), x)


@triton.jit
def decode_attention_kernel(
    Q, KN, VN, KC, VC, MASK, POS, COS, SIN, PM, PL, PACC,
    s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh,
    s_cb, s_ch, s_cs, s_mb, s_rb,
    scale, window, span,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    R: tl.constexpr, INTERLEAVED: tl.constexpr, NSPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    pos = tl.load(POS)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    g_ok = offs_g < G
    q = tl.load(Q + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if R > 0:
        # rotary of q (and below of the new k), fused: out[d] = x[d] cos[d] + sign(d) x[partner(d)] sin[d], d < R
        r_ok, partner, c, sn = _rotary_coeffs(COS, SIN, b * s_rb, offs_d, R, INTERLEAVED)
        q = _rotate_rows(Q + b * s_qb, q, (h * G + offs_g) * s_qh, g_ok, partner, r_ok, c, sn)
    cache_row = b * s_cb + h * s_ch

    m_i = tl.full([G_PAD], _EMPTY_MAX, tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if sid == 0:
        # split 0 writes the new k/v into the cache and starts from the new token: its score is the running
        # max, its value the accumulator
        k_new = tl.load(KN + b * s_knb + h * s_knh + offs_d, mask=d_ok, other=0.0)
        v_new = tl.load(VN + b * s_vnb + h * s_vnh + offs_d, mask=d_ok, other=0.0)
        if R > 0:
            k_new = _rotate_vec(KN + b * s_knb + h * s_knh, k_new, partner, r_ok, c, sn)
        tl.store(KC + cache_row + pos * s_cs + offs_d, k_new, mask=d_ok)
        tl.store(VC + cache_row + pos * s_cs + offs_d, v_new, mask=d_ok)
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
        l_i = tl.full([G_PAD], 1.0, tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32) + v_new.to(tl.float32)[None, :]

    # this split's slots: [lo, end) cut into NSPLIT chunks of a whole number of blocks (all on the device)
    end = tl.minimum(pos, span)
    lo = end * 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0)
    n = tl.maximum(end - lo, 0)
    chunk = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_S) * BLOCK_S
    s_lo = lo + sid * chunk
    s_hi = tl.minimum(s_lo + chunk, end)
    for start in range(s_lo, s_hi, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        in_range = offs_s < s_hi
        # K, V and the mask load at once; masked slots are dropped after the load
        ld = in_range[:, None] & d_ok[None, :]
        valid = (tl.load(MASK + b * s_mb + offs_s, mask=in_range, other=0) != 0) & in_range
        k = tl.load(KC + cache_row + offs_s[:, None] * s_cs + offs_d[None, :], mask=ld, other=0.0)
        v = tl.load(VC + cache_row + offs_s[:, None] * s_cs + offs_d[None, :], mask=ld, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.where(valid[:, None], v, 0.0)  # a masked slot's value may be anything (0 * NaN)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    head = (b * HKV + h) * G + offs_g  # query head over [B * HQ]
    part = head * NSPLIT + sid
    tl.store(PM + part, m_i, mask=g_ok)
    tl.store(PL + part, l_i, mask=g_ok)
    tl.store(PACC + part[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def decode_attention_combine_kernel(
    PM, PL, PACC, OUT, s_ob, s_oh,
    HQ: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, NSPLIT: tl.constexpr, NS_PAD: tl.constexpr,
):
    """One program per query head: combine the ``NSPLIT`` partials of :func:`decode_attention_kernel`."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_j = tl.arange(0, NS_PAD)
    offs_d = tl.arange(0, D_PAD)
    j_ok = offs_j < NSPLIT
    d_ok = offs_d < D
    part = pid * NSPLIT + offs_j
    m_j = tl.load(PM + part, mask=j_ok, other=float("-inf"))
    l_j = tl.load(PL + part, mask=j_ok, other=0.0)
    acc_j = tl.load(PACC + part[:, None] * D + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.max(m_j, axis=0)
    w = tl.exp(m_j - m)  # 0 for empty splits and padding
    l = tl.sum(l_j * w, axis=0)
    out = tl.sum(acc_j * w[:, None], axis=0) / l
    tl.store(OUT + b * s_ob + hq * s_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit
def decode_attention_single_kernel(
    Q, KN, VN, KC, VC, MASK, POS, OUT, COS, SIN,
    s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh,
    s_cb, s_ch, s_cs, s_mb, s_ob, s_oh, s_rb,
    scale, window, span,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    R: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    """One program per (row, KV head) over all its slots (the kernel before the split; see the module
    docstring): used when ``B * HKV`` programs fill the GPU alone, where it is faster than one split."""
    pid = tl.program_id(0)
    b = pid // HKV
    h = pid % HKV
    pos = tl.load(POS)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    g_ok = offs_g < G
    q = tl.load(Q + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    k_new = tl.load(KN + b * s_knb + h * s_knh + offs_d, mask=d_ok, other=0.0)
    v_new = tl.load(VN + b * s_vnb + h * s_vnh + offs_d, mask=d_ok, other=0.0)
    if R > 0:
        # rotary of q and the new k, fused: out[d] = x[d] cos[d] + sign(d) x[partner(d)] sin[d] for d < R
        r_ok, partner, c, sn = _rotary_coeffs(COS, SIN, b * s_rb, offs_d, R, INTERLEAVED)
        q = _rotate_rows(Q + b * s_qb, q, (h * G + offs_g) * s_qh, g_ok, partner, r_ok, c, sn)
        k_new = _rotate_vec(KN + b * s_knb + h * s_knh, k_new, partner, r_ok, c, sn)
    cache_row = b * s_cb + h * s_ch
    tl.store(KC + cache_row + pos * s_cs + offs_d, k_new, mask=d_ok)
    tl.store(VC + cache_row + pos * s_cs + offs_d, v_new, mask=d_ok)

    # the new token: its score starts the running max, its value the accumulator
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
    m_i = s_new
    l_i = tl.full([G_PAD], 1.0, tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32) + v_new.to(tl.float32)[None, :]

    end = tl.minimum(pos, span)
    for start in range(0, end, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        in_range = offs_s < end
        valid = (tl.load(MASK + b * s_mb + offs_s, mask=in_range, other=0) != 0) & in_range
        if HAS_WINDOW:
            valid = valid & (offs_s > pos - window)
        k = tl.load(KC + cache_row + offs_s[:, None] * s_cs + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(VC + cache_row + offs_s[:, None] * s_cs + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(OUT + b * s_ob + (h * G + offs_g)[:, None] * s_oh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])
