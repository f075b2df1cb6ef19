"""One decode step's attention over the static KV cache: write the new k/v at ``cache_pos``, attend.

:func:`decode_attention` is what a decode step's ``attend`` calls. With ``backend="torch"`` (and on the CPU
under ``"auto"``) it is two ``index_copy_`` and PyTorch SDPA over a fixed-size view of the cache with an
additive mask (query heads of one KV group packed on the query axis, so K/V are never repeated). With the
Triton kernel (CUDA under ``"auto"``, or ``"triton"``; ``TRITON_INTERPRET=1`` runs it on CPU tensors) it is
a split-KV ("flash-decoding") launch that does the write, the rotary, the GQA grouping, the masking and an
online softmax over its share of the slots before ``cache_pos`` (bound and shares are computed on the
device, so one CUDA graph replays it at every position), then a small launch that combines the float32
partials. At batch 1 one program per (row, KV head) looped over the whole cache alone (8 programs on a
132-SM GPU: latency-bound); splitting the slots over up to :data:`MAX_SPLITS` programs each puts the whole
GPU on it. Once ``B * Hkv`` programs fill the GPU by themselves, that one-program kernel is used
(:func:`split_plan`).

Example:
    >>> import torch
    >>> b, hq, hkv, d, L = 1, 4, 2, 16, 8
    >>> kc, vc = torch.zeros(b, hkv, L, d), torch.zeros(b, hkv, L, d)
    >>> kv_mask = torch.zeros(b, L, dtype=torch.bool); kv_mask[:, :3] = True
    >>> q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    >>> out = decode_attention(q, k, v, kc, vc, torch.tensor([2]), kv_mask, span=8, backend="torch")
    >>> out.shape, torch.equal(kc[:, :, 2], k[:, :, 0])
    (torch.Size([1, 4, 1, 16]), True)
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import reference as _reference
from ..kernels._common import cdiv, check_launch, load_kernel_module, next_pow2, use_triton
from ..modules.attention import alibi_bias, attention, sdpa
from .kv_cache import decode_mask

__all__ = ["decode_attention", "decode_attention_reference", "split_plan"]


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, cache_pos: torch.Tensor, kv_mask: torch.Tensor, span: int,
                               scale: Optional[float] = None, window: Optional[int] = None,
                               mask: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
                               sin: Optional[torch.Tensor] = None, rotary: Optional[str] = None,
                               softcap: Optional[float] = None, alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch reference: (rotary,) ``index_copy_`` into rows ``[0, B)`` of the caches, SDPA over
    ``[0, span)`` (explicit scores with ``softcap``; ALiBi slopes ``alibi [H]`` add
    ``slope * (slot - cache_pos)``).

    ``mask`` (from :func:`~policyinject.decode.kv_cache.decode_mask`) may be given to share it between
    layers; it is built from ``kv_mask`` otherwise.
    """
    if rotary is not None:
        q, k = _reference.rotary(q, k, cos, sin, layout=rotary)
    b = q.shape[0]
    k_rows, v_rows = k_cache[:b], v_cache[:b]
    k_rows.index_copy_(2, cache_pos, k)
    v_rows.index_copy_(2, cache_pos, v)
    if mask is None:
        mask = decode_mask(kv_mask[:b], cache_pos, span, q.dtype, window)
    if softcap is None and alibi is None:
        return sdpa(q, k_rows[:, :, :span], v_rows[:, :, :span], mask, causal=False, scale=scale)
    bias = None
    if alibi is not None:
        bias = alibi_bias(alibi, cache_pos.reshape(1), torch.arange(span, device=q.device), q.dtype)
    return attention(q, k_rows[:, :, :span], v_rows[:, :, :span], mask, causal=False, scale=scale, softcap=softcap,
                     bias=bias)


#: most splits of one (row, KV head); the combine reads them all
MAX_SPLITS = 32
#: streaming multiprocessors assumed for CPU tensors (the Triton interpreter): few splits, fast tests
_INTERPRETER_SMS = 16


def split_plan(batch: int, kv_heads: int, span: int, device: torch.device) -> "tuple[int, int]":
    """``(num_splits, block_s)`` of the decode attention for a static ``span``.

    While ``batch * kv_heads`` programs occupy at most a quarter of the GPU's SMs, the slots are split so that
    ``batch * kv_heads * num_splits`` about fills them once (at most :data:`MAX_SPLITS`, never more than
    ``span / 16`` blocks), with ``block_s`` the power of two nearest a split's share of the full span, clamped
    to [16, 64]. Beyond that, 1 split (the one-program kernel, blocks of 64 slots): measured faster there.

    Example:
        >>> cpu = torch.device("cpu")  # the interpreter assumes 16 SMs; an H100 has 132
        >>> split_plan(1, 2, 256, cpu), split_plan(4, 2, 256, cpu)
        ((8, 32), (1, 64))
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRETER_SMS
    programs = max(batch * kv_heads, 1)
    if programs > sms // 4:
        return 1, 64
    n = min(MAX_SPLITS, sms // programs, cdiv(int(span), 16))
    if n < 2:
        return 1, 64
    share = cdiv(int(span), n)
    return n, min(64, max(16, next_pow2(share)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_pos: torch.Tensor, kv_mask: torch.Tensor, span: int,
                     scale: Optional[float] = None, window: Optional[int] = None, backend: str = "auto",
                     mask: Optional[torch.Tensor] = None, block_s: Optional[int] = None,
                     cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                     rotary: Optional[str] = None, num_splits: Optional[int] = None,
                     softcap: Optional[float] = None, alibi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of one new token per row over the cache; returns ``[B, Hq, 1, D]``.

    ``q [B, Hq, 1, D]``, ``k``/``v [B, Hkv, 1, D]``; caches ``[B_cap, Hkv, L, D]`` (rows ``[0, B)`` used);
    ``cache_pos`` a one-element long tensor (the slot of the new token, already marked in ``kv_mask [B, L]``);
    ``span`` the slots the reference attends over (the kernel stops at ``cache_pos``). q and k are taken
    after rotary, unless ``rotary`` (``"half"`` or ``"interleaved"``) asks this function to apply it with
    ``cos``/``sin [B, 1, R]`` (the first ``R`` dims of each head rotated).

    Kernel path: split-KV over ``num_splits`` splits per (row, KV head) and blocks of ``block_s`` slots;
    both default to :func:`split_plan` (static for a given span and batch, so a CUDA graph stays valid at
    every position). With more than one split a second, small launch combines the float32 partials; with one,
    a single program per (row, KV head) loops over all the slots.
    """
    if rotary not in (None, "half", "interleaved"):
        raise ValueError(f"rotary must be None, 'half' or 'interleaved', got {rotary!r}")
    if rotary is not None and (cos is None or sin is None):
        raise ValueError("rotary needs cos and sin")
    if softcap is not None or alibi is not None or not use_triton(backend, q, k, v, k_cache, v_cache):
        # soft-capping and ALiBi run on the PyTorch path: the Triton kernel implements neither
        return decode_attention_reference(q, k, v, k_cache, v_cache, cache_pos, kv_mask, span, scale, window, mask,
                                          cos, sin, rotary, softcap, alibi)
    kmod = load_kernel_module("_attention_triton", package="policyinject.decode")

    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if t != 1 or k.shape[2] != 1:
        raise ValueError(f"decode_attention takes one token per row, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group over {hkv} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("the KV cache buffers must be contiguous in head_dim and share strides")
    check_launch("decode_attention", kmod.decode_attention_kernel, q, k, v, k_cache, v_cache)
    plan_splits, plan_block = split_plan(b, hkv, span, q.device)
    nsplit = int(num_splits) if num_splits is not None else plan_splits
    block = int(block_s) if block_s is not None else plan_block
    if nsplit < 1 or block < 16 or block & (block - 1):
        raise ValueError(f"num_splits must be >= 1 and block_s a power of two >= 16, got {nsplit}, {block}")
    g = hq // hkv
    q3 = q[:, :, 0]
    k3, v3 = k[:, :, 0], v[:, :, 0]
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    if k3.stride(-1) != 1:
        k3 = k3.contiguous()
    if v3.stride(-1) != 1:
        v3 = v3.contiguous()
    mask_u8 = kv_mask.view(torch.uint8) if kv_mask.dtype == torch.bool else kv_mask
    r = 0
    cos2 = sin2 = q3  # unused placeholders when no rotary is fused
    if rotary is not None:
        cos2, sin2 = cos.reshape(b, -1), sin.reshape(b, -1)
        r = cos2.shape[-1]
        if r % 2 or r > d or sin2.shape != cos2.shape:
            raise ValueError(f"rotary tables of {r} dims do not fit head_dim {d}")
        if cos2.stride(-1) != 1 or sin2.stride() != cos2.stride():
            cos2, sin2 = cos2.contiguous(), sin2.contiguous()
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    d_pad = max(16, next_pow2(d))
    common = dict(HKV=hkv, G=g, G_PAD=max(16, next_pow2(g)), D=d, D_PAD=d_pad, BLOCK_S=block,
                  HAS_WINDOW=window is not None, DOT_PREC="ieee" if k_cache.dtype == torch.float32 else None,
                  R=r, INTERLEAVED=rotary == "interleaved")
    scale_f = float(scale if scale is not None else d ** -0.5)
    if nsplit == 1:
        kmod.decode_attention_single_kernel[(b * hkv,)](
            q3, k3, v3, k_cache, v_cache, mask_u8, cache_pos, out, cos2, sin2,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), mask_u8.stride(0), out.stride(0),
            out.stride(1), cos2.stride(0), scale_f, int(window or 0), int(span), **common,
        )
        return out[:, :, None]
    # float32 partials of every (query head, split): acc [B*Hq, S, D], then m and l [B*Hq, S]
    parts = b * hq * nsplit
    scratch = torch.empty(parts * (d + 2), dtype=torch.float32, device=q.device)
    pacc, pm, pl = scratch[:parts * d], scratch[parts * d:parts * (d + 1)], scratch[parts * (d + 1):]
    kmod.decode_attention_kernel[(b * hkv, nsplit)](
        q3, k3, v3, k_cache, v_cache, mask_u8, cache_pos, cos2, sin2, pm, pl, pacc,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), mask_u8.stride(0), cos2.stride(0),
        scale_f, int(window or 0), int(span), NSPLIT=nsplit, **common,
    )
    kmod.decode_attention_combine_kernel[(b * hq,)](
        pm, pl, pacc, out, out.stride(0), out.stride(1),
        HQ=hq, D=d, D_PAD=d_pad, NSPLIT=nsplit, NS_PAD=max(2, next_pow2(nsplit)),
    )
    return out[:, :, None]
