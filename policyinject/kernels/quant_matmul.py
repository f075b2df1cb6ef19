"""Weight-only quantized matmuls: ``y = x @ dequant(W).T (+ bias)`` for int8 (w8a16) and int4 (w4a16) weights.

The weight format is :class:`policyinject.kernels.quantize.QuantizedWeight`. Two Triton kernels, both
dequantizing in registers (no dequantized copy of the weight is ever written) and accumulating in float32:

* ``_qgemv_kernel`` for decode (``M <= 4`` rows): each program streams ``BN`` weight rows in K steps of
  ``GPB`` groups of ``GK`` values, one 3-D tile ``[BN, GPB, GK]`` (bytes of one row contiguous, 16-byte
  loads), multiplies by the activation row(s) and accumulates elementwise; the group scale multiplies the
  product (per output channel: once, at the end). K is split over programs (``split_k``, float32 atomics)
  when the rows alone do not fill the GPU.
* ``_qgemm_kernel`` for prefill and batched decode: tiles of ``[BM, BN]`` with ``tl.dot`` on the
  dequantized integers (exact in bf16/fp16), one K step never crossing a group, so the group scale applies to
  the partial product of the step. int4 splits the activation into even and odd columns and does two dots
  against the low and high nibbles.

Integers become floats with the exponent trick (``float_bits(0x4B000000 | u) - 2^23 == u`` for ``u < 2^23``),
an integer OR and a float add instead of the slower int->float conversion unit.

Example:
    >>> import torch
    >>> from policyinject.kernels.quantize import quantize_weight
    >>> x, qw = torch.randn(3, 64), quantize_weight(torch.randn(16, 64), 4, 32)
    >>> quant_matmul(x, qw, backend="torch").shape
    torch.Size([3, 16])
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import UnsupportedError
from .gemv import (
    _next_pow2, _sm_count, outputs_per_program, pick_split_k, resolve_backend, split_k_output, triton_cdiv,
    triton_launchable,
)
from .quant_reference import quant_matmul_reference
from .quantize import QuantizedWeight

from ._gemv_epilogue import load_act, store_gated, store_tile, tile_rows
from ._q4mma_gluon import GLUON_AVAILABLE, q4mma_kernel, q4mma_layout_lanes

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "quant_matmul", "quant_gated_matmul", "w8a16_matmul", "w4a16_matmul", "quant_matmul_config", "triton_supports",
    "QGEMV_MAX_M",
]

#: Batches up to this many rows take the GEMV kernel; larger ones the tl.dot kernel.
QGEMV_MAX_M = 4


def triton_supports(qw: QuantizedWeight) -> Optional[str]:
    """None when the Triton kernels take this weight, else the reason (a sentence naming the group size).

    They take one scale per output channel (any K), or groups that are a multiple of 32 (16 for int8).

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> triton_supports(quantize_weight(torch.randn(4, 96), 4, 32)) is None
        True
        >>> triton_supports(quantize_weight(torch.randn(4, 96), 4, 24))
        'group_size=24 (in_features=96): the Triton kernels need one scale per output channel or groups that are a multiple of 32; use backend="torch"'
    """
    if qw.per_channel:
        return None
    multiple = 16 if qw.num_bits == 8 else 32
    if qw.group_size % multiple == 0:
        return None
    return (
        f"group_size={qw.group_size} (in_features={qw.in_features}): the Triton kernels need one scale per "
        f"output channel or groups that are a multiple of {multiple}; use backend=\"torch\""
    )


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def quant_matmul_config(
    m: int, n: int, k: int, num_bits: int, group_size: int, sm_count: int = 132, interpret: bool = False
) -> dict:
    """Heuristic launch config: ``{"kernel": "gemv"|"gemm", ...block sizes, split_k, num_warps}``.

    GEMV: a K step of ``GPB * GK`` values (``GK`` divides the group; per-channel: the largest power of two
    dividing K, else a masked tail), about 4 KB of weight per program and step, the grid covering the SMs
    twice (fewer rows per program, then split K). GEMM: 16/64/128-row tiles by M, ``BK`` dividing the group.
    Under the interpreter: small tiles (its cost is per program and per op, not per byte).

    Example:
        >>> quant_matmul_config(1, 4096, 4096, 4, 32)  # int4 at batch 1: the tensor-core GEMV
        {'kernel': 'q4mma', 'BN': 16, 'NQ': 8, 'split_k': 1, 'num_warps': 4}
        >>> quant_matmul_config(4, 4096, 4096, 4, 128)["kernel"]  # a few rows: CUDA-core words
        'q4gemv'
        >>> quant_matmul_config(1, 4096, 4096, 8, 4096)["kernel"]
        'q8gemv'
        >>> quant_matmul_config(64, 4096, 4096, 8, 4096)["kernel"]
        'gemm'
    """
    per_channel = group_size == k
    if num_bits == 8 and per_channel and m == 1 and not interpret:
        return _q8gemv_config(n, k, sm_count)
    if num_bits == 4:
        cfg = _q4mma_config(m, n, k, group_size, interpret)
        if cfg is not None:
            return cfg
    if m <= QGEMV_MAX_M and num_bits == 4 and k % 32 == 0:
        cfg = _q4gemv_config(m, n, k, group_size, sm_count, interpret)
        if cfg is not None:
            return cfg
    return _quant_matmul_config(m, n, k, num_bits, group_size, sm_count, interpret)


def _q8gemv_config(n: int, k: int, sm_count: int) -> dict:
    """Batch-1 config of the int8 per-output-channel GEMV (``q8gemv``).

    K steps of 2048 (the largest power of two up to 2048 dividing K; a masked tail when that is under 1024).
    Tall weights (16384 rows or more): 4 rows per program, 16 bytes of a row per thread and load, 4 warps.
    Others: 2 rows, 8 bytes, 2 warps. Measured on H100s (``benchmarks/gemv_sweep.py``, NOTES "session 4"):
    best or within 6% of the best of 48 tiles on every Llama-3-8B and 3.2-1B shape (run 3), and 2 warps gained
    6% on the 8B qkv in a 96-tile sweep of the smaller shapes (run 11).

    Example:
        >>> quant_matmul_config(1, 28672, 4096, 8, 4096)
        {'kernel': 'q8gemv', 'BM': 1, 'BN': 4, 'BK': 2048, 'VEC': 16, 'split_k': 1, 'num_warps': 4}
        >>> quant_matmul_config(1, 6144, 4096, 8, 4096)
        {'kernel': 'q8gemv', 'BM': 1, 'BN': 2, 'BK': 2048, 'VEC': 8, 'split_k': 1, 'num_warps': 2}
        >>> quant_matmul_config(1, 576, 1536, 8, 1536)["BK"]  # no 1024-multiple: a masked tail
        2048
    """
    tall = n >= 16384
    bn, vec, warps = (4, 16, 4) if tall else (2, 8, 2)
    bk = _pow2_divisor(k, 2048)
    if bk < 1024:
        bk = min(_next_pow2(k), 2048)
    split_k = pick_split_k(triton_cdiv(n, bn), triton_cdiv(k, bk), sm_count)
    return {"kernel": "q8gemv", "BM": 1, "BN": bn, "BK": bk, "VEC": vec, "split_k": split_k, "num_warps": warps}


def _byte_gemv_config(m: int, n: int, k: int, group_size: int, sm_count: int, interpret: bool) -> dict:
    """The int4 byte-kernel GEMV config (the word kernel's fallback)."""
    return _quant_matmul_config(m, n, k, 4, group_size, sm_count, interpret)


def _quant_matmul_config(m: int, n: int, k: int, num_bits: int, group_size: int, sm_count: int,
                         interpret: bool) -> dict:
    per_channel = group_size == k
    if m <= QGEMV_MAX_M:
        bm = _next_pow2(m)
        bytes_per_value = num_bits / 8
        max_row_bytes = 256 if interpret else 1024  # bytes of one row per step
        max_gk = int(max_row_bytes / bytes_per_value)
        if per_channel:
            gk = _pow2_divisor(k, max_gk)
            if gk < 64 and gk < k:
                gk = min(_next_pow2(k), max_gk)  # masked tail
            gpb = 1
        else:
            gk = _pow2_divisor(group_size, max_gk)
            gpb = _pow2_divisor(k // gk, max(max_gk // gk, 1)) if gk == group_size else 1
        bk = gpb * gk
        row_bytes = int(bk * bytes_per_value)
        target = 1024 if interpret else max(4096 // max(bm // 2, 1), 1024)
        bn = max(1, min(64, target // row_bytes))
        bn = 1 << (bn.bit_length() - 1)
        while bn > 1 and triton_cdiv(n, bn) < 2 * sm_count:
            bn //= 2
        steps = triton_cdiv(k, bk)
        split_k = pick_split_k(triton_cdiv(n, bn), steps, sm_count) if not interpret else 1
        return {"kernel": "gemv", "BM": bm, "BN": bn, "GPB": gpb, "GK": gk, "split_k": split_k, "num_warps": 4}
    min_bk = 16 if num_bits == 8 else 32
    if interpret:
        bm, bn, bk_cap, warps, stages = 16, 16, 64, 4, 1
    elif m <= 16:
        bm, bn, bk_cap, warps, stages = 16, 64, 256 if num_bits == 4 else 128, 4, 4
    elif m <= 64:
        bm, bn, bk_cap, warps, stages = 64, 64, 128, 4, 4
    else:
        # prefill (benchmarks/gemm_sweep.py, H100 runs 5 and 7, NOTES "session 4"): 64 weight rows per tile
        # (int8: 128 where that still fills the SMs), 128 activation rows (64 where that leaves SMs idle),
        # K steps of 128 for int4 and 64 for int8, 4 warps: within 4.5% of the best of 51 tiles summed over
        # the 8B qkv/o/gate_up/down shapes at M = 128 and 512 (worst case 1.35x), where session 3's tile
        # was 1.7x (int8) to 5x (int4) slower
        bn, warps, stages = 64, 4, 3
        bk_cap = 128 if num_bits == 4 else 64
        if num_bits == 8 and triton_cdiv(m, 128) * triton_cdiv(n, 128) >= sm_count:
            bn = 128
        bm = 128 if triton_cdiv(m, 128) * triton_cdiv(n, bn) >= sm_count else 64
    if per_channel:
        bk = _pow2_divisor(k, bk_cap)
        if bk < min_bk:
            bk = bk_cap  # masked tail
    else:
        bk = _pow2_divisor(group_size, bk_cap)
        if bk == group_size and group_size < bk_cap:  # several whole groups per K step (MULTI_GROUP)
            bk = group_size * _pow2_divisor(k // group_size, bk_cap // group_size)
    bk = max(bk, min_bk)
    programs = triton_cdiv(m, bm) * triton_cdiv(n, bn)
    split_k = 1 if (interpret or m > 64) else pick_split_k(programs, triton_cdiv(k, bk), sm_count)
    return {"kernel": "gemm", "BM": bm, "BN": bn, "BK": bk, "split_k": split_k, "num_warps": warps,
            "num_stages": stages}


def _q4mma_config(m: int, n: int, k: int, group_size: int, interpret: bool) -> Optional[dict]:
    """Launch config of the tensor-core int4 GEMV (batch 1, bf16 activations), or None where it does not take
    the shape (``benchmarks/q4mma_probe.py``, H100, NOTES "session 3").

    16 rows per program and K steps of 8 chunks of 128 features (4 for tall weights, 16384 rows or more),
    fewer chunks where K has no such divisor (then more rows, to fill the layout); no K split (it measured
    slower once the activations were read with 16-byte loads, and costs two launches). It beat or tied the
    CUDA-core word kernel on every Llama-8B shape for groups 32 and 128 (8B o 7.9 vs 12.6 us at group 32).

    Example:
        >>> quant_matmul_config(1, 28672, 4096, 4, 32)
        {'kernel': 'q4mma', 'BN': 16, 'NQ': 4, 'split_k': 1, 'num_warps': 4}
        >>> quant_matmul_config(1, 4096, 14336, 4, 32)["NQ"]
        8
    """
    if m != 1 or interpret or k % 128:
        return None
    if group_size != k and group_size % 32:
        return None
    nq = _pow2_divisor(k // 128, 4 if n >= 16384 else 8)
    bn = max(16, 2 * q4mma_layout_lanes(nq)[0] * 4)  # the layout's rows per program (4 warps)
    return {"kernel": "q4mma", "BN": bn, "NQ": nq, "split_k": 1, "num_warps": 4}


def _q4gemv_config(m: int, n: int, k: int, group_size: int, sm_count: int, interpret: bool) -> Optional[dict]:
    """Launch config of the int32-word int4 GEMV, or None when it does not take the shape.

    Sub-blocks of ``GK`` = 128 features (64 bytes of a row: four 16-byte loads by four threads) or the largest
    power of two dividing the group; ``GPB`` sub-blocks per K step; ``BN`` rows per program; K split while
    the grid covers the SMs less than twice.
    """
    g = k if group_size == k else group_size
    gk = _pow2_divisor(g, 32 if interpret else 128)
    if gk < 32 and not interpret:
        return None
    if gk < 8 or k % gk:
        return None
    steps_total = k // gk
    if interpret:
        gpb, bn = _pow2_divisor(steps_total, 2), 4
    elif m == 1:
        # measured on an H100 (benchmarks/quant.py --tune, NOTES run 5): 8 rows x 8 sub-blocks (4 KB per step)
        # is best or within 3% on every 8B/1B shape; very tall weights (8B gate_up) prefer 64 rows x 2
        gpb, bn = (2, 64) if n >= 16 * sm_count * 8 else (8, 8)
    else:
        gpb, bn = 8, 16 if n >= 4096 else 4
    gpb = _pow2_divisor(steps_total, gpb)
    while bn > 1 and triton_cdiv(n, bn) < sm_count:
        bn //= 2
    split_k = 1 if interpret else pick_split_k(triton_cdiv(n, bn) * 2, steps_total // gpb, sm_count)
    return {"kernel": "q4gemv", "BM": _next_pow2(m), "BN": bn, "GPB": gpb, "GK": gk, "split_k": split_k,
            "num_warps": 4, "word_loads": False}


if triton is not None:

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
        gate|up weight of ``2 N`` rows, SwiGLU in the epilogue (``_gemv_epilogue.tile_rows``)."""
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


def _int4_words(qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """The packed int4 weight viewed as int32 words ``[N, K // 8]`` (8 nibbles each, feature ``8w + i`` in bits
    ``4i..4i+3``), or None when its layout does not allow it (K not a multiple of 8, unaligned rows)."""
    q = qw.qweight
    if qw.num_bits != 4 or qw.in_features % 8 or q.stride(-1) != 1 or q.stride(0) % 4 or q.data_ptr() % 16:
        return None
    try:
        return q.view(torch.int32)
    except RuntimeError:
        return None


def q4gemv_supported(qw: QuantizedWeight, gk: int) -> bool:
    """Whether the int32-word int4 GEMV takes this weight with sub-blocks of ``gk`` features."""
    if qw.num_bits != 4 or qw.in_features % 8 or gk % 8:
        return False
    if qw.per_channel:
        return qw.in_features % gk == 0
    return qw.group_size % gk == 0


def _launch_q4gemv(x2, qw, words, bias, cfg) -> torch.Tensor:
    m, k = x2.shape
    n = qw.out_features
    gpb, gk = int(cfg["GPB"]), int(cfg["GK"])
    bk = gpb * gk
    if not qw.per_channel and qw.group_size % gk != 0:
        raise ValueError(f"config GK={gk} must divide group_size={qw.group_size}")
    bm = int(cfg.get("BM", _next_pow2(m)))
    if bm < m or m > 4:
        raise ValueError(f"q4gemv takes 1..4 rows within BM={bm}, got M={m}")
    y, k_per_split, split_k = split_k_output(x2, n, k, int(cfg.get("split_k", 1)), bk)
    even_k = k % k_per_split == 0
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    grid = (triton_cdiv(n, int(cfg["BN"])), split_k)
    _q4gemv_kernel[grid](
        x2, words, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        m, n, k, k_per_split,
        x2.stride(0), words.stride(0), qw.scales.stride(0), y.stride(0), 1,
        SYMMETRIC=qw.zeros is None, PER_CHANNEL=qw.per_channel, G=qw.group_size, HAS_BIAS=bias is not None,
        BM=bm, ROWS=m, BN=int(cfg["BN"]), GPB=gpb, WG=gk // 8, EVEN_K=even_k, SPLIT_K=split_k,
        ASM=x2.is_cuda, WORD_LOADS=bool(cfg.get("word_loads", False)),
        num_warps=int(cfg.get("num_warps", 4)),
    )
    return y.to(x2.dtype) if split_k > 1 else y


def _q4mma_words(x2: torch.Tensor, qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """The int4 weight as int32 words when the tensor-core GEMV takes this activation and weight, else None.

    It takes one bf16 row on a CUDA GPU (with Gluon), K a multiple of 128, groups a multiple of 32 (or one per
    output channel) and a packed layout the word kernels can read (:func:`_int4_words`).
    """
    if (not GLUON_AVAILABLE or not x2.is_cuda or x2.dtype != torch.bfloat16 or x2.shape[0] != 1
            or qw.num_bits != 4 or qw.in_features % 128):
        return None
    if not qw.per_channel and qw.group_size % 32:
        return None
    return _int4_words(qw)


def _launch_q4mma(x2, qw, words, bias, cfg, gated: bool = False) -> torch.Tensor:
    """One activation row against int4 words on the tensor cores (:mod:`._q4mma_gluon`); ``gated``: the
    weight is gate|up and the result ``silu(gate) * up`` (``out_features / 2`` values)."""
    m, k = x2.shape
    n = qw.out_features // 2 if gated else qw.out_features
    bn, nq, warps = int(cfg["BN"]), int(cfg["NQ"]), int(cfg.get("num_warps", 4))
    tpw = q4mma_layout_lanes(nq)
    if m != 1 or bn % 2 or k % (nq * 128) or (bn // 2) < tpw[0] * warps or nq < tpw[1]:
        raise ValueError(f"q4mma takes one row, K={k} in whole steps of NQ*128, and a tile that fills the "
                         f"layout (BN/2 >= {tpw[0] * warps} rows), got M={m}, {dict(cfg)}")
    y, k_per_split, split_k = split_k_output(x2, n, k, 1 if gated else int(cfg.get("split_k", 1)), nq * 128)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    q4mma_kernel[(triton_cdiv(n, bn // 2 if gated else bn), split_k)](
        x2, words, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        n, k, k_per_split, words.stride(0), qw.scales.stride(0),
        SYMMETRIC=qw.zeros is None, PER_CHANNEL=qw.per_channel, G=qw.group_size, HAS_BIAS=bias is not None,
        BN=bn, NQ=nq, SPLIT_K=split_k, TPW_R=tpw[0], TPW_Q=tpw[1], WARPS=warps, GATED=gated, num_warps=warps,
    )
    return y.to(x2.dtype) if split_k > 1 else y


def _launch_q8gemv(x2, qw, bias, cfg, gated: bool = False) -> torch.Tensor:
    """int8 per-output-channel weights, 1..16 rows: the 16-bit-GEMV-shaped kernel. ``gated``: ``qw`` is a
    fused gate|up weight and the result ``silu(gate) * up`` (one row, no K split, ``BN`` even)."""
    triton_launchable(_q8gemv_kernel, x2, qw.qweight)
    m, k = x2.shape
    n = qw.out_features // 2 if gated else qw.out_features
    bm, bn, bk = int(cfg.get("BM", _next_pow2(m))), int(cfg["BN"]), int(cfg["BK"])
    vec = int(cfg.get("VEC", 8))
    if bm < m or bk % vec:
        raise ValueError(f"q8gemv config {dict(cfg)} does not fit M={m} (BM >= M, VEC divides BK)")
    split_k = int(cfg.get("split_k", 1))
    outputs = outputs_per_program(bn, gated, m, split_k, cfg, "q8gemv")
    y, k_per_split, split_k = split_k_output(x2, n, k, split_k, bk)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    _q8gemv_kernel[(triton_cdiv(n, outputs), split_k)](
        x2, qw.qweight, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        m, n, k, k_per_split, x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0), y.stride(0),
        SYMMETRIC=qw.zeros is None, HAS_BIAS=bias is not None, BM=bm, ROWS=m, BN=bn, BK=bk,
        EVEN_K=k % k_per_split == 0, SPLIT_K=split_k, VEC=vec, ASM=x2.is_cuda and bool(cfg.get("asm", True)),
        GATED=gated, num_warps=int(cfg.get("num_warps", 4)),
    )
    return y.to(x2.dtype) if split_k > 1 else y


def _launch(x2: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor], cfg: Mapping) -> torch.Tensor:
    kernel_name = cfg.get("kernel", "gemv")
    if kernel_name == "q8gemv":
        if qw.num_bits != 8 or not qw.per_channel:
            raise ValueError("the q8gemv kernel takes int8 weights with one scale per output channel")
        return _launch_q8gemv(x2, qw, bias, cfg)
    if kernel_name == "q4mma":
        if not GLUON_AVAILABLE or not x2.is_cuda:
            raise UnsupportedError("the q4mma kernel needs a CUDA GPU and Triton's Gluon (triton >= 3.5)")
        words = _q4mma_words(x2, qw)
        if words is None:
            raise ValueError(f"the q4mma kernel does not take this weight/activation ({dict(cfg)}, "
                             f"{x2.dtype}, M={x2.shape[0]})")
        return _launch_q4mma(x2, qw, words, bias, cfg)
    if kernel_name == "q4gemv":
        triton_launchable(_q4gemv_kernel, x2, qw.qweight)
        words = _int4_words(qw)
        if words is not None and q4gemv_supported(qw, int(cfg["GK"])) and x2.shape[0] <= 4:
            return _launch_q4gemv(x2, qw, words, bias, cfg)
        cfg = dict(cfg, kernel="gemv")  # layout the word kernel cannot read: the byte kernel takes it
        kernel_name = "gemv"
    kernel = _qgemv_kernel if kernel_name == "gemv" else _qgemm_kernel
    triton_launchable(kernel, x2, qw.qweight)
    m, k = x2.shape
    n = qw.out_features
    if kernel_name == "gemv":
        bk = int(cfg["GPB"]) * int(cfg["GK"])
    else:
        bk = int(cfg["BK"])
    if not qw.per_channel and qw.group_size % bk != 0 and bk % qw.group_size != 0:
        raise ValueError(f"config K step {bk} must divide group_size={qw.group_size} or be a multiple of it")
    y, k_per_split, split_k = split_k_output(x2, n, k, int(cfg.get("split_k", 1)), bk)
    even_k = k % k_per_split == 0
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    common = dict(
        BITS=qw.num_bits, SYMMETRIC=qw.zeros is None, PER_CHANNEL=qw.per_channel, G=qw.group_size,
        HAS_BIAS=bias is not None, EVEN_K=even_k, SPLIT_K=split_k,
    )
    args = (
        x2, qw.qweight, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        m, n, k, k_per_split,
        x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0), y.stride(0),
    )
    if kernel_name == "gemv":
        bm = int(cfg.get("BM", _next_pow2(m)))
        if bm < m:
            raise ValueError(f"config BM={bm} is smaller than the batch M={m}")
        grid = (triton_cdiv(n, int(cfg["BN"])), split_k)
        _qgemv_kernel[grid](
            *args, BM=bm, ROWS=m, BN=int(cfg["BN"]), GPB=int(cfg["GPB"]), GK=int(cfg["GK"]),
            num_warps=int(cfg.get("num_warps", 4)), **common,
        )
    else:
        bm, bn = int(cfg["BM"]), int(cfg["BN"])
        dot_f32 = (not x2.is_cuda) or x2.dtype == torch.float32
        grid = (triton_cdiv(m, bm) * triton_cdiv(n, bn), split_k)
        _qgemm_kernel[grid](
            *args, BM=bm, BN=bn, BK=bk, DOT_F32=dot_f32, GROUP_M=8,
            MULTI_GROUP=(not qw.per_channel and bk > qw.group_size),
            num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)), **common,
        )
    return y.to(x2.dtype) if split_k > 1 else y


def quant_matmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """``x @ dequantize(qw).T + bias`` for ``x`` of shape ``[..., in_features]``, in ``x``'s dtype.

    ``backend``: ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"triton"`` (also on CPU under
    ``TRITON_INTERPRET=1``) or ``"torch"``. ``config`` overrides :func:`quant_matmul_config`.

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> qw = quantize_weight(torch.randn(8, 32), 8)
        >>> quant_matmul(torch.randn(2, 5, 32), qw, torch.zeros(8), backend="torch").shape
        torch.Size([2, 5, 8])
    """
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={qw.in_features}")
    if resolve_backend(backend, x) == "torch":
        return quant_matmul_reference(x, qw, bias)
    reason = triton_supports(qw)
    if reason is not None:
        raise UnsupportedError(reason)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, qw.out_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = dict(config) if config is not None else quant_matmul_config(
        x2.shape[0], qw.out_features, qw.in_features, qw.num_bits, qw.group_size,
        _sm_count(x.device), interpret=not x.is_cuda,
    )
    if config is None and cfg.get("kernel") == "q4mma" and _q4mma_words(x2, qw) is None:
        # fp16/fp32 activations or a layout the word kernels cannot read: the CUDA-core kernels take it
        cfg = _q4gemv_config(x2.shape[0], qw.out_features, qw.in_features, qw.group_size, _sm_count(x.device),
                             False) or _byte_gemv_config(x2.shape[0], qw.out_features, qw.in_features,
                                                         qw.group_size, _sm_count(x.device), False)
    if config is None and cfg.get("kernel") == "q4gemv" and x2.dtype == torch.float32:
        # the word kernel's unpacking trades ~8 of float32's 24 bits (relative error ~1e-5): fine for 16-bit
        # activations, not for float32 ones, which take the byte kernel
        cfg = _byte_gemv_config(x2.shape[0], qw.out_features, qw.in_features, qw.group_size,
                                _sm_count(x.device), not x.is_cuda)
    y = _launch(x2, qw, bias, cfg)
    return y.reshape(*lead, qw.out_features)


def quant_gated_matmul(
    x: torch.Tensor, qw: QuantizedWeight, activation: str, bias: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``act(gate) * up`` of a fused gate|up quantized projection in one kernel, or None where no fused kernel
    applies (then compute ``gated_act(quant_matmul(x, qw, bias))``).

    One activation row on a CUDA GPU and ``activation`` ``"silu"`` (SwiGLU); int4 through the tensor-core
    GEMV (:mod:`._q4mma_gluon`, bf16, a shape it takes), int8 per output channel through ``q8gemv``. The
    gate and up sums stay float32 into the activation.

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> quant_gated_matmul(torch.randn(1, 256), quantize_weight(torch.randn(64, 256), 4, 32), "silu") is None
        True
    """
    if activation != "silu" or qw.out_features % 2 or x.shape[-1] != qw.in_features:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1 or not x2.is_cuda or triton is None:
        return None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if qw.num_bits == 8 and qw.per_channel:
        cfg = _q8gemv_config(qw.out_features, qw.in_features, _sm_count(x.device))
        y = _launch_q8gemv(x2, qw, bias, dict(cfg, split_k=1), gated=True)
    else:
        words = _q4mma_words(x2, qw)
        if words is None:
            return None
        cfg = _q4mma_config(1, qw.out_features, qw.in_features, qw.group_size, False)
        y = _launch_q4mma(x2, qw, words, bias, cfg, gated=True)
    return y.reshape(*x.shape[:-1], qw.out_features // 2)


def _wrap(qweight, scales, zeros, num_bits, in_features):
    if scales.dim() != 2 or scales.shape[0] != qweight.shape[0]:
        raise ValueError(f"scales must be [out_features, groups], got {tuple(scales.shape)}")
    groups = scales.shape[1]
    if in_features % groups != 0:
        raise ValueError(f"in_features={in_features} is not divisible by the {groups} scale groups")
    return QuantizedWeight(
        qweight=qweight, scales=scales, zeros=zeros, num_bits=num_bits, group_size=in_features // groups,
        in_features=in_features, out_features=qweight.shape[0],
    )


def w8a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """int8 weight ``[N, K]``, scales (and zeros) ``[N, K // group_size]``: ``x @ ((q - z) * s).T + bias``.

    Example:
        >>> q = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
        >>> w8a16_matmul(torch.randn(1, 64), q, torch.ones(8, 2), backend="torch").shape
        torch.Size([1, 8])
    """
    return quant_matmul(x, _wrap(qweight, scales, zeros, 8, qweight.shape[1]), bias, backend=backend, config=config)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """Packed int4 weight uint8 ``[N, K // 2]`` (see :func:`~policyinject.kernels.quantize.pack_int4`).

    Example:
        >>> q = torch.randint(0, 256, (8, 32), dtype=torch.uint8)
        >>> w4a16_matmul(torch.randn(3, 64), q, torch.ones(8, 2), backend="torch").shape
        torch.Size([3, 8])
    """
    return quant_matmul(x, _wrap(qweight, scales, zeros, 4, qweight.shape[1] * 2), bias, backend=backend, config=config)
