"""Launchers of the quantized matmul kernels: check a config against the weight and activation, size the
grid and the (split-K) output, launch. :func:`launch` dispatches on ``config["kernel"]``.

A Triton-only module: :mod:`policyinject.kernels.quant_matmul` imports it through
:func:`~policyinject.kernels._common.load_kernel_module` on the Triton path only.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import UnsupportedError
from ._common import cdiv, next_pow2, triton_launchable
from ._q4mma_gluon import GLUON_AVAILABLE, q4mma_kernel, q4mma_layout_lanes
from ._quant_gemm_triton import _qgemm_kernel
from ._quant_gemv_triton import _q4gemv_kernel, _q8gemv_kernel, _qgemv_kernel
from .gemv import outputs_per_program, split_k_output
from .quantize import QuantizedWeight

__all__ = [
    "launch", "launch_q4gemv", "launch_q4mma", "launch_q8gemv", "int4_words", "q4gemv_supported", "q4mma_words",
]


def int4_words(qw: QuantizedWeight) -> Optional[torch.Tensor]:
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


def launch_q4gemv(x2, qw, words, bias, cfg) -> torch.Tensor:
    """1..4 activation rows against int4 ``words`` (:func:`int4_words`) on the CUDA cores (``_q4gemv_kernel``)."""
    m, k = x2.shape
    n = qw.out_features
    gpb, gk = int(cfg["GPB"]), int(cfg["GK"])
    bk = gpb * gk
    if not qw.per_channel and qw.group_size % gk != 0:
        raise ValueError(f"config GK={gk} must divide group_size={qw.group_size}")
    bm = int(cfg.get("BM", next_pow2(m)))
    if bm < m or m > 4:
        raise ValueError(f"q4gemv takes 1..4 rows within BM={bm}, got M={m}")
    y, k_per_split, split_k = split_k_output(x2, n, k, int(cfg.get("split_k", 1)), bk)
    even_k = k % k_per_split == 0
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    grid = (cdiv(n, int(cfg["BN"])), split_k)
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


def q4mma_words(x2: torch.Tensor, qw: QuantizedWeight) -> Optional[torch.Tensor]:
    """The int4 weight as int32 words when the tensor-core GEMV takes this activation and weight, else None.

    It takes one bf16 row on a CUDA GPU (with Gluon), K a multiple of 128, groups a multiple of 32 (or one per
    output channel) and a packed layout the word kernels can read (:func:`int4_words`).
    """
    if (not GLUON_AVAILABLE or not x2.is_cuda or x2.dtype != torch.bfloat16 or x2.shape[0] != 1
            or qw.num_bits != 4 or qw.in_features % 128):
        return None
    if not qw.per_channel and qw.group_size % 32:
        return None
    return int4_words(qw)


def launch_q4mma(x2, qw, words, bias, cfg, gated: bool = False) -> torch.Tensor:
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
    q4mma_kernel[(cdiv(n, bn // 2 if gated else bn), split_k)](
        x2, words, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        n, k, k_per_split, words.stride(0), qw.scales.stride(0),
        SYMMETRIC=qw.zeros is None, PER_CHANNEL=qw.per_channel, G=qw.group_size, HAS_BIAS=bias is not None,
        BN=bn, NQ=nq, SPLIT_K=split_k, TPW_R=tpw[0], TPW_Q=tpw[1], WARPS=warps, GATED=gated, num_warps=warps,
    )
    return y.to(x2.dtype) if split_k > 1 else y


def launch_q8gemv(x2, qw, bias, cfg, gated: bool = False) -> torch.Tensor:
    """int8 per-output-channel weights, 1..16 rows: the 16-bit-GEMV-shaped kernel. ``gated``: ``qw`` is a
    fused gate|up weight and the result ``silu(gate) * up`` (one row, no K split, ``BN`` even)."""
    triton_launchable(_q8gemv_kernel, x2, qw.qweight)
    m, k = x2.shape
    n = qw.out_features // 2 if gated else qw.out_features
    bm, bn, bk = int(cfg.get("BM", next_pow2(m))), int(cfg["BN"]), int(cfg["BK"])
    vec = int(cfg.get("VEC", 8))
    if bm < m or bk % vec:
        raise ValueError(f"q8gemv config {dict(cfg)} does not fit M={m} (BM >= M, VEC divides BK)")
    split_k = int(cfg.get("split_k", 1))
    outputs = outputs_per_program(bn, gated, m, split_k, cfg, "q8gemv")
    y, k_per_split, split_k = split_k_output(x2, n, k, split_k, bk)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    _q8gemv_kernel[(cdiv(n, outputs), split_k)](
        x2, qw.qweight, qw.scales, zeros, bias if bias is not None else qw.scales, y,
        m, n, k, k_per_split, x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0), y.stride(0),
        SYMMETRIC=qw.zeros is None, HAS_BIAS=bias is not None, BM=bm, ROWS=m, BN=bn, BK=bk,
        EVEN_K=k % k_per_split == 0, SPLIT_K=split_k, VEC=vec, ASM=x2.is_cuda and bool(cfg.get("asm", True)),
        GATED=gated, num_warps=int(cfg.get("num_warps", 4)),
    )
    return y.to(x2.dtype) if split_k > 1 else y


def launch(x2: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor], cfg: Mapping) -> torch.Tensor:
    """``x2 @ dequant(qw).T + bias`` for ``[M, K]`` rows through the kernel ``cfg["kernel"]`` names
    (``q8gemv``, ``q4mma``, ``q4gemv``, ``gemv``, ``gemm`` or ``dequant``) with the block sizes of ``cfg``; a ``q4gemv``
    config falls back to the byte kernel where the word kernel cannot read the weight's layout."""
    kernel_name = cfg.get("kernel", "gemv")
    if kernel_name == "dequant":  # large M: a dequantized scratch copy of the weight, then cuBLAS
        from ._dequant_triton import launch_dequant_matmul

        return launch_dequant_matmul(x2, qw, bias)
    if kernel_name == "q8gemv":
        if qw.num_bits != 8 or not qw.per_channel:
            raise ValueError("the q8gemv kernel takes int8 weights with one scale per output channel")
        return launch_q8gemv(x2, qw, bias, cfg)
    if kernel_name == "q4mma":
        if not GLUON_AVAILABLE or not x2.is_cuda:
            raise UnsupportedError("the q4mma kernel needs a CUDA GPU and Triton's Gluon (triton >= 3.5)")
        words = q4mma_words(x2, qw)
        if words is None:
            raise ValueError(f"the q4mma kernel does not take this weight/activation ({dict(cfg)}, "
                             f"{x2.dtype}, M={x2.shape[0]})")
        return launch_q4mma(x2, qw, words, bias, cfg)
    if kernel_name == "q4gemv":
        triton_launchable(_q4gemv_kernel, x2, qw.qweight)
        words = int4_words(qw)
        if words is not None and q4gemv_supported(qw, int(cfg["GK"])) and x2.shape[0] <= 4:
            return launch_q4gemv(x2, qw, words, bias, cfg)
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
        bm = int(cfg.get("BM", next_pow2(m)))
        if bm < m:
            raise ValueError(f"config BM={bm} is smaller than the batch M={m}")
        grid = (cdiv(n, int(cfg["BN"])), split_k)
        _qgemv_kernel[grid](
            *args, BM=bm, ROWS=m, BN=int(cfg["BN"]), GPB=int(cfg["GPB"]), GK=int(cfg["GK"]),
            num_warps=int(cfg.get("num_warps", 4)), **common,
        )
    else:
        bm, bn = int(cfg["BM"]), int(cfg["BN"])
        dot_f32 = (not x2.is_cuda) or x2.dtype == torch.float32
        grid = (cdiv(m, bm) * cdiv(n, bn), split_k)
        _qgemm_kernel[grid](
            *args, BM=bm, BN=bn, BK=bk, DOT_F32=dot_f32, GROUP_M=8,
            MULTI_GROUP=(not qw.per_channel and bk > qw.group_size),
            num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)), **common,
        )
    return y.to(x2.dtype) if split_k > 1 else y
