"""Decode GEMV: ``y = x @ W.T (+ bias)`` for a 16-bit weight and a handful of rows (batch 1..16).

At batch 1 the weight is read once and every byte of it is used for one multiply-add, so the kernel is a pure
stream over the weight: each program owns ``BN`` output rows and walks K in blocks of ``BK`` elements with
16-byte loads (``BK`` contiguous elements of each row), multiplies by the activation rows (all ``M <= BM`` of
them, so the weight is read once whatever the batch) and accumulates in float32. ``split_k > 1`` splits K
over programs for short-and-wide weights (few output rows); the partial sums meet in a float32 buffer through
atomic adds.

Configs come from a shape heuristic (:func:`gemv_config`); pass ``config=`` to override (the benchmark
sweeps). Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors.

Example:
    >>> import torch
    >>> x, w = torch.randn(1, 64), torch.randn(32, 64)
    >>> torch.allclose(gemv(x, w, backend="torch"), x @ w.T, atol=1e-4)
    True
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ._common import cdiv, floor_pow2, load_kernel_module, next_pow2, resolve_backend, sm_count
from .quant_reference import gemv_reference

__all__ = ["gemv", "gemv_gated", "gemv_config", "gemv_rms_norm", "gemv_rms_norm_config", "GEMV_MAX_M"]

#: Largest batch the GEMV kernel takes (the activation rows live in registers).
GEMV_MAX_M = 16


def gemv_config(m: int, n: int, k: int, element_size: int = 2, sm_count: int = 132) -> dict:
    """Heuristic launch config for :func:`gemv`: ``BN``, ``BK``, ``split_k``, ``num_warps``.

    About 8 KB of weight per program and loop step (``BN * BK * element_size``), 16 KB in flight per SM with
    two resident programs; fewer rows per program when the grid would not cover the SMs twice; split K when
    even one row per program leaves SMs idle.

    Example:
        >>> gemv_config(1, 4096, 4096)
        {'BM': 1, 'BN': 2, 'BK': 2048, 'split_k': 1, 'num_warps': 8}
        >>> gemv_config(2, 4096, 4096)
        {'BM': 2, 'BN': 8, 'BK': 512, 'split_k': 1, 'num_warps': 4}
        >>> gemv_config(1, 256, 8192)["split_k"] > 1
        True
    """
    bm = next_pow2(max(m, 1))
    if bm == 1 and element_size == 2 and k % 1024 == 0 and cdiv(n, 2) >= 2 * sm_count:
        # batch 1, 16-bit: 2 rows x 2048 (or 1024) elements per step, 8 (4) warps; measured on an H100
        # (benchmarks/quant.py --tune, NOTES run 5) best or within 1% on the Llama-3.2-1B shapes, 3-8% faster
        # than the generic pick below for the 2048-wide down/o projections, gate_up and lm_head
        bk = 2048 if k % 2048 == 0 else 1024
        return {"BM": 1, "BN": 2, "BK": bk, "split_k": 1, "num_warps": 8 if bk == 2048 else 4}
    bk = pick_block_k(k, 1024 // element_size)
    # weight elements per step: 4096 (8 KB of bf16) at batch 1..2, fewer as more activation rows multiply
    # each element, so that the BM x BN x BK product stays at 8192 values (64 registers per thread).
    elems = max(min(4096, 8192 // bm), 512)
    bn = max(1, min(64, elems // bk))
    bn = floor_pow2(bn)
    while bn > 1 and cdiv(n, bn) < 2 * sm_count:
        bn //= 2
    split_k = pick_split_k(cdiv(n, bn), cdiv(k, bk), sm_count)
    return {"BM": bm, "BN": bn, "BK": bk, "split_k": split_k, "num_warps": 4}


def pick_block_k(k: int, max_bk: int, min_even: int = 64) -> int:
    """The largest power of two <= ``max_bk`` that divides ``k`` (no K mask, 16-byte loads), if it is at least
    ``min_even``; else ``min(next_pow2(k), max_bk)`` with a masked tail.

    Example:
        >>> pick_block_k(4096, 512), pick_block_k(576, 512), pick_block_k(1000, 512)
        (512, 64, 512)
    """
    bk = max_bk
    while bk > 1 and k % bk != 0:
        bk //= 2
    if bk >= min_even or bk >= k:
        return bk
    return min(next_pow2(k), max_bk)


def pick_split_k(programs: int, k_steps: int, sm_count: int) -> int:
    """Split K (by a power of two that divides the number of K steps, so every split is full) while the grid
    covers fewer than two programs per SM and each split keeps at least two steps.

    Example:
        >>> pick_split_k(64, 32, 132), pick_split_k(1024, 32, 132)
        (8, 1)
    """
    split_k = 1
    while programs * split_k < 2 * sm_count and k_steps % (split_k * 2) == 0 and k_steps // (split_k * 2) >= 2:
        split_k *= 2
    return split_k


def outputs_per_program(bn: int, gated: bool, m: int, split_k: int, config: Mapping, kernel: str) -> int:
    """Outputs of one program of a GEMV-style launch with ``BN`` weight rows: ``BN``, or for a gated launch
    (fused gate|up weight, SwiGLU epilogue: ``_gemv_epilogue_triton.tile_rows``) ``BN // 2``; a gated launch takes
    one activation row, an even ``BN`` and no K split, else ``ValueError`` naming ``kernel``.

    Example:
        >>> outputs_per_program(4, False, 3, 2, {}, "GEMV"), outputs_per_program(4, True, 1, 1, {}, "GEMV")
        (4, 2)
    """
    if not gated:
        return bn
    if m != 1 or bn % 2 or split_k != 1:
        raise ValueError(f"the gated {kernel} takes one row, an even BN and no K split, got M={m}, {dict(config)}")
    return bn // 2


def split_k_output(x2: torch.Tensor, n: int, k: int, split_k: int, step: int) -> tuple:
    """``(y, k_per_split, split_k)`` for a GEMV-style launch over ``[M, K]`` rows ``x2`` and ``n`` outputs: K is
    cut into splits of whole ``step``-sized K steps (``split_k`` is recomputed so none is empty); ``y`` is a
    zeroed float32 buffer for the atomic adds when K is split, else an uninitialised one in ``x2``'s dtype.

    Example:
        >>> y, per_split, splits = split_k_output(torch.zeros(1, 1000), 8, 1000, 3, 128)
        >>> (y.dtype, per_split, splits)
        (torch.float32, 384, 3)
    """
    k_per_split = cdiv(cdiv(k, split_k), step) * step
    split_k = cdiv(k, k_per_split)
    m = x2.shape[0]
    if split_k > 1:
        return torch.zeros((m, n), device=x2.device, dtype=torch.float32), k_per_split, split_k
    return torch.empty((m, n), device=x2.device, dtype=x2.dtype), k_per_split, split_k


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x`` of shape ``[..., K]`` with at most :data:`GEMV_MAX_M` rows.

    ``weight`` is ``[N, K]`` (16-bit or float32, same dtype as ``x``), ``bias`` ``[N]`` or None. The result has
    ``x``'s dtype. ``backend``: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or ``"torch"``.
    ``config`` overrides :func:`gemv_config` (keys ``BM``, ``BN``, ``BK``, ``split_k``, ``num_warps``).

    Example:
        >>> x, w, b = torch.randn(2, 3, 48), torch.randn(10, 48), torch.randn(10)
        >>> gemv(x, w, b, backend="torch").shape
        torch.Size([2, 3, 10])
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} ([N, K])")
    if resolve_backend(backend, x) == "torch":
        return gemv_reference(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got {m}; use F.linear for larger batches")
    if m == 0:
        return x.new_empty(*lead, weight.shape[0])
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = dict(config) if config is not None else gemv_config(
        m, weight.shape[0], weight.shape[1], weight.element_size(), sm_count(x.device)
    )
    cfg.setdefault("BM", next_pow2(m))
    y = load_kernel_module("_gemv_triton").launch_gemv(x2, weight, bias, cfg)
    return y.reshape(*lead, weight.shape[0])


def gemv_gated(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """``silu(gate) * up`` of one activation row through a fused gate|up ``weight`` (``[2 I, K]``, gate rows
    first) in one kernel: each program reads gate row ``j`` and up row ``I + j`` and applies SwiGLU to the
    float32 sums (no ``[2 I]`` intermediate, no activation kernel). ``backend="torch"``: the reference
    (matmul, then the activation). ``config`` as for :func:`gemv` (``BN`` even, no K split).

    Example:
        >>> x, w = torch.randn(1, 64), torch.randn(16, 64)
        >>> g, u = (x @ w.T).chunk(2, dim=-1)
        >>> torch.allclose(gemv_gated(x, w, backend="torch"), torch.nn.functional.silu(g) * u, atol=1e-5)
        True
    """
    if weight.dim() != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"gemv_gated: x {tuple(x.shape)} does not match a fused gate|up weight "
                         f"{tuple(weight.shape)} ([2 I, K])")
    x2 = x.reshape(-1, x.shape[-1])
    if resolve_backend(backend, x) == "torch":
        gate, up = gemv_reference(x, weight, bias).chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if x2.shape[0] != 1:
        raise ValueError(f"gemv_gated takes one activation row, got {x2.shape[0]}")
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv_gated: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    x2 = x2.contiguous()
    weight = weight.contiguous()
    cfg = dict(config) if config is not None else gemv_config(
        1, weight.shape[0], weight.shape[1], weight.element_size(), sm_count(x.device))
    cfg.setdefault("BM", 1)
    if config is None:
        cfg["BN"], cfg["split_k"] = max(2, int(cfg["BN"])), 1
    bias = bias.contiguous() if bias is not None else None
    y = load_kernel_module("_gemv_triton").launch_gemv(x2, weight, bias, cfg, gated=True)
    return y.reshape(*x.shape[:-1], weight.shape[0] // 2)


def gemv_rms_norm_config(n: int, k: int, gated: bool = False, element_size: int = 2, sm_count: int = 132) -> dict:
    """Launch config of :func:`gemv_rms_norm` for ``n`` weight rows (``BN``, ``BK``, ``num_warps``):
    :func:`gemv_config`'s batch-1 pick without a K split (every program needs the whole row's sum of squares),
    ``BN`` even when gated.

    Example:
        >>> gemv_rms_norm_config(4096, 4096)
        {'BN': 2, 'BK': 2048, 'num_warps': 8}
    """
    cfg = gemv_config(1, n, k, element_size, sm_count)
    bn = int(cfg["BN"]) * (2 if gated and int(cfg["BN"]) % 2 else 1)
    return {"BN": bn, "BK": int(cfg["BK"]), "num_warps": int(cfg["num_warps"])}


def gemv_rms_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    weight_offset: float = 0.0,
    gated: bool = False,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Residual add, RMSNorm and a decode GEMV of one activation row in one kernel: ``s = x + residual``
    (rounded to ``x``'s dtype; ``residual=None``: ``s = x``), ``n = rms_norm(s) * (weight_offset +
    norm_weight)``, returns ``(n @ weight.T + bias, s)``. ``gated``: ``weight`` is a fused gate|up ``[2 I, K]``
    and the first result is ``silu(gate) * up``, as :func:`gemv_gated`. The Triton kernel scales the float32
    sums by the row's ``1/rms`` in its epilogue, so the normalised row is never rounded to 16 bits (the
    two-kernel path rounds it). ``config`` overrides :func:`gemv_rms_norm_config`.

    Example:
        >>> from policyinject.kernels.norms import add_rms_norm
        >>> x, r, g, w = torch.randn(1, 64), torch.randn(1, 64), torch.rand(64), torch.randn(8, 64)
        >>> y, s = gemv_rms_norm(x, r, g, 1e-6, w, backend="torch")
        >>> n, s2 = add_rms_norm(x, r, g, 1e-6, backend="torch")
        >>> torch.allclose(y, n @ w.T, atol=1e-4), torch.equal(s, s2)
        (True, True)
    """
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    if weight.dim() != 2 or weight.shape[1] != k or (gated and weight.shape[0] % 2):
        raise ValueError(f"gemv_rms_norm: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
                         f"({'[2 I, K] gate|up' if gated else '[N, K]'})")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"gemv_rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    if norm_weight.shape != (k,):
        raise ValueError(f"gemv_rms_norm: norm weight {tuple(norm_weight.shape)} is not [{k}]")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if resolve_backend(backend, x) == "torch":
        from .reference import add_rms_norm, rms_norm

        normed, s = (add_rms_norm(x, residual, norm_weight, eps, weight_offset) if residual is not None
                     else (rms_norm(x, norm_weight, eps, weight_offset), x))
        y = gemv_gated(normed, weight, bias, backend="torch") if gated else gemv_reference(normed, weight, bias)
        return y, s
    if rows != 1:
        raise ValueError(f"gemv_rms_norm takes one activation row, got {rows}")
    if not (x.dtype == weight.dtype == norm_weight.dtype) or (residual is not None and residual.dtype != x.dtype):
        raise TypeError(f"gemv_rms_norm: x {x.dtype}, residual {None if residual is None else residual.dtype}, "
                        f"norm weight {norm_weight.dtype} and weight {weight.dtype} must share one dtype")
    cfg = dict(config) if config is not None else gemv_rms_norm_config(
        weight.shape[0], k, gated, weight.element_size(), sm_count(x.device))
    y, s = load_kernel_module("_gemv_norm_triton").launch_gemv_rms_norm(
        x.reshape(k).contiguous(), None if residual is None else residual.reshape(k).contiguous(),
        norm_weight.contiguous(), eps, weight_offset, weight.contiguous(),
        None if bias is None else bias.contiguous(), cfg, gated)
    return y.reshape(*x.shape[:-1], n_out), (x if s is None else s.reshape(x.shape))
