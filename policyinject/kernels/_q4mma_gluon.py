"""The tensor-core int4 decode GEMV (batch 1, bf16 activations), written in Gluon for explicit layouts.

``y = x @ dequant(W).T`` for one activation row and an int4 weight packed as int32 words (8 nibbles, feature
``8w + i`` in bits ``4i..4i+3``, each stored as ``q + 8``), with group scales (and zero points) every 32..K
features. Each lane dequantizes its words to bf16 and feeds them to ``mma.sync.m16n8k16`` together with the
matching activations; see :func:`q4mma_pair_step` for why the four lanes of an MMA quad must hold the same
weight rows, which is why this kernel uses Gluon (every tensor's layout is stated) rather than Triton's
automatic layouts (which assign lanes differently across Triton versions and tile shapes).

Layout of the weight tile ``[BN / 2, NQ, 4, 4]`` (int32 words; a program owns ``BN`` rows as a top and a
bottom half, and a K step of ``NQ`` chunks of 128 features): each lane holds one 16-byte load (the last
dimension: 4 words, 32 features of one row), the four lanes of a quad hold one row's 128-feature chunk,
then lanes spread over chunks and rows, warps over rows; larger tiles repeat along the rows, so a thread
reuses its activations for several rows.
"""

from __future__ import annotations

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - old Triton or none
    gluon = None
    gl = None

__all__ = ["GLUON_AVAILABLE", "q4mma_kernel", "q4mma_layout_lanes"]

GLUON_AVAILABLE = gluon is not None
q4mma_kernel = None  # defined below when Gluon is available


def q4mma_layout_lanes(nq: int) -> tuple:
    """Threads per warp along ``[rows, chunks, lanes-of-a-chunk, words]`` for ``nq`` chunks per K step.

    Example:
        >>> q4mma_layout_lanes(2), q4mma_layout_lanes(16)
        ((4, 2, 4, 1), (1, 8, 4, 1))
    """
    along_q = min(nq, 8)
    return (32 // (4 * along_q), along_q, 4, 1)


if GLUON_AVAILABLE:

    @gluon.jit
    def q4mma_pair_step(wt, wb, st, ct, sb, cb, x0, x1, x2, x3, c0, c1, c2, c3):
        """One packed int4 word of a top row (``wt``) and of a bottom row (``wb``), 8 features each, into two
        ``mma.sync.m16n8k16`` steps on the accumulators ``c0..c3``.

        Each word becomes four bf16 pairs ``(u_i, u_i+4)`` (one ``lop3`` each: the nibbles at bits ``4i`` and
        ``16 + 4i`` land in two bf16 mantissas with exponent 128, giving ``128 + u``), minus 136 (exact: the
        integer ``q = u - 8``), times the group scale plus ``-z * s`` (``st``/``ct``, ``sb``/``cb``: bf16
        pairs; one rounding to bf16, as a 16-bit weight has). The activations ``x0..x3`` are the matching bf16
        pairs ``(x_i, x_i+4)``. In the MMA the lane's top pairs are A rows ``g`` and its bottom pairs rows
        ``g + 8`` (``g`` = lane / 4), its activations B column ``g``: the MMA sums the four lanes of a quad
        into ``D[g, g]`` and ``D[g + 8, g]``, which is a dot product only because those four lanes hold the
        same two rows; every other entry of ``D`` mixes quads and is ignored (see :func:`q4mma_diagonal`).
        The outputs are written by the last instruction only (an output may share an input's register)."""
        return gl.inline_asm_elementwise(
            """{
            .reg .b32 t<4>, b<4>, s, k;
            .reg .f32 d<4>;
            mov.b32 k, 0x43084308;
            lop3.b32 t0, $4, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $4, 4;  lop3.b32 t1, s, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $4, 8;  lop3.b32 t2, s, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $4, 12; lop3.b32 t3, s, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 b0, $5, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $5, 4;  lop3.b32 b1, s, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $5, 8;  lop3.b32 b2, s, 0x000F000F, 0x43004300, 0xEA;
            shr.u32 s, $5, 12; lop3.b32 b3, s, 0x000F000F, 0x43004300, 0xEA;
            sub.bf16x2 t0, t0, k; sub.bf16x2 t1, t1, k; sub.bf16x2 t2, t2, k; sub.bf16x2 t3, t3, k;
            sub.bf16x2 b0, b0, k; sub.bf16x2 b1, b1, k; sub.bf16x2 b2, b2, k; sub.bf16x2 b3, b3, k;
            fma.rn.bf16x2 t0, t0, $6, $7; fma.rn.bf16x2 t1, t1, $6, $7;
            fma.rn.bf16x2 t2, t2, $6, $7; fma.rn.bf16x2 t3, t3, $6, $7;
            fma.rn.bf16x2 b0, b0, $8, $9; fma.rn.bf16x2 b1, b1, $8, $9;
            fma.rn.bf16x2 b2, b2, $8, $9; fma.rn.bf16x2 b3, b3, $8, $9;
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0,d1,d2,d3}, {t0,b0,t1,b1}, {$10,$11}, {$14,$15,$16,$17};
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {t2,b2,t3,b3}, {$12,$13}, {d0,d1,d2,d3};
            }""",
            "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,f,f,f,f",
            [wt, wb, st, ct, sb, cb, x0, x1, x2, x3, c0, c1, c2, c3],
            dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)

    @gluon.jit
    def q4mma_x_pairs(addr):
        """The 8 bf16 activations of one packed weight word, read with one 16-byte load from ``addr`` (an
        int64 address; the word's features are contiguous) and regrouped as the pairs ``(x_i, x_i+4)`` the
        weight nibbles come in (one ``prmt`` each). One vector load per word instead of four scalar ones: the
        scalar loads of a warp touched 16 cache lines each and made the kernel L1-bound."""
        return gl.inline_asm_elementwise(
            "{ .reg .b32 a, b, c, d; ld.global.nc.v4.b32 {a, b, c, d}, [$4]; "
            "prmt.b32 $0, a, c, 0x5410; prmt.b32 $1, a, c, 0x7632; "
            "prmt.b32 $2, b, d, 0x5410; prmt.b32 $3, b, d, 0x7632; }",
            "=r,=r,=r,=r,l", [addr], dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def bf16x2(v):
        """float32 ``v`` rounded to bf16 and duplicated into both halves of an int32 (a bf16 pair)."""
        b = v.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return b | (b << 16)

    @gluon.jit
    def q4mma_diagonal(c_even, c_odd):
        """The useful MMA sums: lane ``4g + g // 2`` holds ``D[g, g]`` in register ``g % 2`` (``c_even`` /
        ``c_odd``); every other lane's value is zeroed."""
        lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [c_even.to(gl.int32, bitcast=True)],
                                         dtype=gl.int32, is_pure=True, pack=1)
        quad = lane // 4
        keep = (lane % 4) == quad // 2
        return gl.where(keep, gl.where((quad % 2) == 1, c_odd, c_even), 0.0)

    @gluon.jit
    def q4mma_load_step(pt, pb, X32, xi, S, Z, rt3, rb3, stride_sn, lane_k, k0,
                        SYMMETRIC: gl.constexpr, PER_CHANNEL: gl.constexpr, G: gl.constexpr):
        """Everything one K step reads: the top and bottom weight words, the activation pairs, and (grouped
        weights) the bf16-pair scales and ``-z * s`` of each lane's group; per output channel the last four
        are placeholders (the kernel sets them once)."""
        kw = gl.multiple_of(k0 // 8, 16)
        w_t = gl.load(pt + kw)
        w_b = gl.load(pb + kw)
        x0, x1, x2, x3 = q4mma_x_pairs((X32 + gl.multiple_of(k0 // 2, 64) + xi).to(gl.int64, bitcast=True))
        if PER_CHANNEL:
            zero = gl.expand_dims(gl.zeros_like(rt3 + lane_k), 3)
            return w_t, w_b, x0, x1, x2, x3, zero, zero, zero, zero
        gidx = (k0 + lane_k) // G
        s_t = gl.load(S + rt3 * stride_sn + gidx).to(gl.float32)
        s_b = gl.load(S + rb3 * stride_sn + gidx).to(gl.float32)
        st = gl.expand_dims(bf16x2(s_t), 3)
        sb = gl.expand_dims(bf16x2(s_b), 3)
        if SYMMETRIC:
            ct = gl.expand_dims(bf16x2(s_t * 0.0), 3)
            cb = ct
        else:
            ct = gl.expand_dims(bf16x2(-gl.load(Z + rt3 * stride_sn + gidx).to(gl.float32) * s_t), 3)
            cb = gl.expand_dims(bf16x2(-gl.load(Z + rb3 * stride_sn + gidx).to(gl.float32) * s_b), 3)
        return w_t, w_b, x0, x1, x2, x3, st, ct, sb, cb

    @gluon.jit
    def q4mma_kernel(
        X, QW, S, Z, B, Y,
        N, K, K_PER_SPLIT,
        stride_wn, stride_sn,
        SYMMETRIC: gl.constexpr,
        PER_CHANNEL: gl.constexpr,
        G: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BN: gl.constexpr,
        NQ: gl.constexpr,
        SPLIT_K: gl.constexpr,
        TPW_R: gl.constexpr,
        TPW_Q: gl.constexpr,
        WARPS: gl.constexpr,
        GATED: gl.constexpr = False,
    ):
        """See the module docstring. ``TPW_R``/``TPW_Q`` come from :func:`q4mma_layout_lanes`; ``WARPS``
        must equal the launch's ``num_warps``. With ``SPLIT_K > 1`` the partial sums are atomically added
        into a float32 ``Y`` (the first split adds the bias).

        ``GATED``: the weight is a fused gate|up projection of ``2 N`` rows and ``Y`` gets the ``N`` values
        ``silu(gate) * up`` (SwiGLU): a program's top rows are gate rows ``j`` and its bottom rows the up rows
        ``N + j`` of the same outputs, so the activation runs on the float32 sums in the epilogue (no
        ``[2 N]`` intermediate, no activation kernel). Needs ``SPLIT_K == 1``."""
        L4: gl.constexpr = gl.BlockedLayout([1, 1, 1, 4], [TPW_R, TPW_Q, 4, 1], [WARPS, 1, 1, 1], [3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, L4)
        L2: gl.constexpr = gl.SliceLayout(2, L3)
        LR: gl.constexpr = gl.SliceLayout(1, L2)  # rows
        LQ: gl.constexpr = gl.SliceLayout(0, L2)  # chunks
        LL: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, L3))  # lanes of a chunk
        LE: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4)))  # words of a lane
        HALF: gl.constexpr = BN // 2
        BK: gl.constexpr = NQ * 128
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        if GATED:
            out_t = pid_n * HALF + gl.arange(0, HALF, layout=LR)
            out_b = out_t
            rows_t = out_t % N
            rows_b = rows_t + N
        else:
            out_t = pid_n * BN + gl.arange(0, HALF, layout=LR)
            out_b = out_t + HALF
            rows_t = out_t % N
            rows_b = out_b % N
        q3 = gl.expand_dims(gl.expand_dims(gl.arange(0, NQ, layout=LQ), 0), 2)  # [1, NQ, 1]
        l3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=LL), 0), 1)  # [1, 1, 4]
        e4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=LE), 0), 1), 2)  # [1,1,1,4]
        wofs = gl.expand_dims(q3 * 16 + l3 * 4, 3) + e4  # word index inside the step [1, NQ, 4, 4]
        rt4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows_t, 1), 2), 3)
        rb4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows_b, 1), 2), 3)
        pt = QW + rt4 * stride_wn + wofs
        pb = QW + rb4 * stride_wn + wofs
        X32 = X.to(gl.pointer_type(gl.int32), bitcast=True)
        xi = wofs * 4  # the first of each word's four bf16 activation pairs
        lane_k = q3 * 128 + l3 * 32  # first feature of each lane's 4 words [1, NQ, 4]
        rt3 = gl.expand_dims(gl.expand_dims(rows_t, 1), 2)
        rb3 = gl.expand_dims(gl.expand_dims(rows_b, 1), 2)
        c0 = gl.zeros([HALF, NQ, 4, 4], gl.float32, L4)
        c1 = gl.zeros([HALF, NQ, 4, 4], gl.float32, L4)
        c2 = gl.zeros([HALF, NQ, 4, 4], gl.float32, L4)
        c3 = gl.zeros([HALF, NQ, 4, 4], gl.float32, L4)
        if PER_CHANNEL:
            st = bf16x2(gl.full([HALF, 1, 1, 1], 1.0, gl.float32, L4))
            sb = st
            if SYMMETRIC:
                ct = bf16x2(gl.zeros([HALF, 1, 1, 1], gl.float32, L4))
                cb = ct
            else:
                ct = gl.expand_dims(bf16x2(-gl.load(Z + rt3 * stride_sn).to(gl.float32)), 3)
                cb = gl.expand_dims(bf16x2(-gl.load(Z + rb3 * stride_sn).to(gl.float32)), 3)
        k_start = gl.multiple_of(pid_k * K_PER_SPLIT, BK)
        k_end = gl.minimum(k_start + K_PER_SPLIT, K)
        for k0 in range(k_start, k_end, BK):
            w_t, w_b, x0, x1, x2, x3, st_k, ct_k, sb_k, cb_k = q4mma_load_step(
                pt, pb, X32, xi, S, Z, rt3, rb3, stride_sn, lane_k, k0, SYMMETRIC, PER_CHANNEL, G)
            if not PER_CHANNEL:
                st, ct, sb, cb = st_k, ct_k, sb_k, cb_k
            c0, c1, c2, c3 = q4mma_pair_step(w_t, w_b, st, ct, sb, cb, x0, x1, x2, x3, c0, c1, c2, c3)
        y_t = gl.sum(gl.sum(gl.sum(q4mma_diagonal(c0, c1), axis=3), axis=2), axis=1)
        y_b = gl.sum(gl.sum(gl.sum(q4mma_diagonal(c2, c3), axis=3), axis=2), axis=1)
        if PER_CHANNEL:
            y_t = y_t * gl.load(S + rows_t * stride_sn).to(gl.float32)
            y_b = y_b * gl.load(S + rows_b * stride_sn).to(gl.float32)
        if HAS_BIAS:
            bt = gl.load(B + rows_t).to(gl.float32)
            bb = gl.load(B + rows_b).to(gl.float32)
            if SPLIT_K > 1:
                bt = gl.where(pid_k == 0, bt, 0.0)
                bb = gl.where(pid_k == 0, bb, 0.0)
            y_t += bt
            y_b += bb
        if GATED:
            y = y_t / (1.0 + gl.exp(-y_t)) * y_b
            gl.store(Y + out_t, y.to(Y.dtype.element_ty), mask=out_t < N)
        elif SPLIT_K > 1:
            gl.atomic_add(Y + out_t, y_t, mask=out_t < N)
            gl.atomic_add(Y + out_b, y_b, mask=out_b < N)
        else:
            gl.store(Y + out_t, y_t.to(Y.dtype.element_ty), mask=out_t < N)
            gl.store(Y + out_b, y_b.to(Y.dtype.element_ty), mask=out_b < N)
