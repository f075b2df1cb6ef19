"""Launch-config heuristics of the quantized matmul kernels: which kernel and which tile for a shape.

:func:`quant_matmul_config` picks one of six kernels (``q8gemv``, ``q4mma``, ``q4gemv``, ``gemv``, ``gemm``,
``dequant``;
see :mod:`policyinject.kernels.quant_matmul`) and its block sizes, K split and warps from ``(m, n, k)``, the
bit width, the group size and the GPU's SM count. Pure functions of their arguments; no Triton needed.

Example:
    >>> quant_matmul_config(1, 4096, 4096, 8, 4096)["kernel"]
    'q8gemv'
"""

from __future__ import annotations

from typing import Optional

from ._common import cdiv, floor_pow2, next_pow2, pow2_divisor
from ._q4mma_gluon import q4mma_layout_lanes
from .gemv import pick_split_k

__all__ = ["quant_matmul_config", "QGEMV_MAX_M", "DEQUANT_MIN_M"]

#: Batches up to this many rows take the GEMV kernel; larger ones the tl.dot kernel.
QGEMV_MAX_M = 4

#: From this many activation rows on (per bit width), the weight is dequantized into a scratch matrix and
#: cuBLAS multiplies (kernel ``"dequant"``): the extra write + read of the weight costs less than the
#: dequantize-in-tile kernel loses to cuBLAS there. Weights of fewer than :data:`DEQUANT_TALL_N` rows switch
#: from :data:`DEQUANT_MIN_M_SHORT` rows on. Measured on an H200 (``benchmarks/dequant_sweep.py``, Llama-3-8B
#: shapes, CUDA-graph timing, 2026-12-03): at M = 128 dequantize + cuBLAS wins on qkv, o and down (int8 38 /
#: 28 / 89 us against 40 / 30 / 118) and loses on gate|up (166 against 82); at 256 it wins on every shape.
DEQUANT_MIN_M = {8: 256, 4: 256}
DEQUANT_MIN_M_SHORT = 128
DEQUANT_TALL_N = 16384


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
        >>> quant_matmul_config(2048, 4096, 4096, 4, 32)  # prefill: dequantize, then cuBLAS
        {'kernel': 'dequant'}
    """
    per_channel = group_size == k
    if not interpret and num_bits in DEQUANT_MIN_M and (
            m >= DEQUANT_MIN_M[num_bits] or (m >= DEQUANT_MIN_M_SHORT and n < DEQUANT_TALL_N)):
        return {"kernel": "dequant"}
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
    bk = pow2_divisor(k, 2048)
    if bk < 1024:
        bk = min(next_pow2(k), 2048)
    split_k = pick_split_k(cdiv(n, bn), cdiv(k, bk), sm_count)
    return {"kernel": "q8gemv", "BM": 1, "BN": bn, "BK": bk, "VEC": vec, "split_k": split_k, "num_warps": warps}


def _byte_gemv_config(m: int, n: int, k: int, group_size: int, sm_count: int, interpret: bool) -> dict:
    """The int4 byte-kernel GEMV config (the word kernel's fallback)."""
    return _quant_matmul_config(m, n, k, 4, group_size, sm_count, interpret)


def _quant_matmul_config(m: int, n: int, k: int, num_bits: int, group_size: int, sm_count: int,
                         interpret: bool) -> dict:
    per_channel = group_size == k
    if m <= QGEMV_MAX_M:
        bm = next_pow2(m)
        bytes_per_value = num_bits / 8
        max_row_bytes = 256 if interpret else 1024  # bytes of one row per step
        max_gk = int(max_row_bytes / bytes_per_value)
        if per_channel:
            gk = pow2_divisor(k, max_gk)
            if gk < 64 and gk < k:
                gk = min(next_pow2(k), max_gk)  # masked tail
            gpb = 1
        else:
            gk = pow2_divisor(group_size, max_gk)
            gpb = pow2_divisor(k // gk, max(max_gk // gk, 1)) if gk == group_size else 1
        bk = gpb * gk
        row_bytes = int(bk * bytes_per_value)
        target = 1024 if interpret else max(4096 // max(bm // 2, 1), 1024)
        bn = max(1, min(64, target // row_bytes))
        bn = floor_pow2(bn)
        while bn > 1 and cdiv(n, bn) < 2 * sm_count:
            bn //= 2
        steps = cdiv(k, bk)
        split_k = pick_split_k(cdiv(n, bn), steps, sm_count) if not interpret else 1
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
        if num_bits == 8 and cdiv(m, 128) * cdiv(n, 128) >= sm_count:
            bn = 128
        bm = 128 if cdiv(m, 128) * cdiv(n, bn) >= sm_count else 64
    if per_channel:
        bk = pow2_divisor(k, bk_cap)
        if bk < min_bk:
            bk = bk_cap  # masked tail
    else:
        bk = pow2_divisor(group_size, bk_cap)
        if bk == group_size and group_size < bk_cap:  # several whole groups per K step (MULTI_GROUP)
            bk = group_size * pow2_divisor(k // group_size, bk_cap // group_size)
    bk = max(bk, min_bk)
    programs = cdiv(m, bm) * cdiv(n, bn)
    split_k = 1 if (interpret or m > 64) else pick_split_k(programs, cdiv(k, bk), sm_count)
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
    nq = pow2_divisor(k // 128, 4 if n >= 16384 else 8)
    bn = max(16, 2 * q4mma_layout_lanes(nq)[0] * 4)  # the layout's rows per program (4 warps)
    return {"kernel": "q4mma", "BN": bn, "NQ": nq, "split_k": 1, "num_warps": 4}


def _q4gemv_config(m: int, n: int, k: int, group_size: int, sm_count: int, interpret: bool) -> Optional[dict]:
    """Launch config of the int32-word int4 GEMV, or None when it does not take the shape.

    Sub-blocks of ``GK`` = 128 features (64 bytes of a row: four 16-byte loads by four threads) or the largest
    power of two dividing the group; ``GPB`` sub-blocks per K step; ``BN`` rows per program; K split while
    the grid covers the SMs less than twice.
    """
    g = k if group_size == k else group_size
    gk = pow2_divisor(g, 32 if interpret else 128)
    if gk < 32 and not interpret:
        return None
    if gk < 8 or k % gk:
        return None
    steps_total = k // gk
    if interpret:
        gpb, bn = pow2_divisor(steps_total, 2), 4
    elif m == 1:
        # measured on an H100 (benchmarks/quant.py --tune, NOTES run 5): 8 rows x 8 sub-blocks (4 KB per step)
        # is best or within 3% on every 8B/1B shape; very tall weights (8B gate_up) prefer 64 rows x 2
        gpb, bn = (2, 64) if n >= 16 * sm_count * 8 else (8, 8)
    else:
        gpb, bn = 8, 16 if n >= 4096 else 4
    gpb = pow2_divisor(steps_total, gpb)
    while bn > 1 and cdiv(n, bn) < sm_count:
        bn //= 2
    split_k = 1 if interpret else pick_split_k(cdiv(n, bn) * 2, steps_total // gpb, sm_count)
    return {"kernel": "q4gemv", "BM": next_pow2(m), "BN": bn, "GPB": gpb, "GK": gk, "split_k": split_k,
            "num_warps": 4, "word_loads": False}
