"""Triton kernel of one decode step's attention over the static KV cache (see ``attention.py``).

One program per (batch row, KV head): it writes the new k/v into cache slot ``cache_pos``, then runs an
online softmax over the valid slots ``[0, cache_pos)`` (read from the cache, ``BLOCK_S`` slots at a time,
the loop bound read from ``cache_pos`` on the device, so a CUDA graph replays it at any position) plus the
new token (from registers), for the ``G`` query heads that share the KV head at once (padded to 16 rows for
``tl.dot``; float32 caches use IEEE float32 products, not TF32). K/V are never repeated. With ``R > 0`` it
also applies the rotary embedding to q and the new k first (the block then skips its own rotary launch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(
    Q, KN, VN, KC, VC, MASK, POS, OUT, COS, SIN,
    s_qb, s_qh, s_knb, s_knh, s_vnb, s_vnh,
    s_cb, s_ch, s_cs, s_mb, s_ob, s_oh, s_rb,
    scale, window, span,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    R: tl.constexpr, INTERLEAVED: tl.constexpr,
):
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
        r_ok = offs_d < R
        if INTERLEAVED:
            partner = offs_d ^ 1
            sign = tl.where((offs_d % 2) == 0, -1.0, 1.0)
        else:
            partner = tl.where(offs_d < R // 2, offs_d + R // 2, offs_d - R // 2)
            sign = tl.where(offs_d < R // 2, -1.0, 1.0)
        c = tl.load(COS + b * s_rb + offs_d, mask=r_ok, other=1.0).to(tl.float32)
        sn = tl.load(SIN + b * s_rb + offs_d, mask=r_ok, other=0.0).to(tl.float32) * sign
        q_p = tl.load(Q + b * s_qb + (h * G + offs_g)[:, None] * s_qh + partner[None, :],
                      mask=g_ok[:, None] & r_ok[None, :], other=0.0)
        q_rot = q.to(tl.float32) * c[None, :] + q_p.to(tl.float32) * sn[None, :]
        q = tl.where(r_ok[None, :], q_rot.to(q.dtype), q)
        k_p = tl.load(KN + b * s_knb + h * s_knh + partner, mask=r_ok, other=0.0)
        k_rot = k_new.to(tl.float32) * c + k_p.to(tl.float32) * sn
        k_new = tl.where(r_ok, k_rot.to(k_new.dtype), k_new)
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
