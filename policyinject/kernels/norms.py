"""Fused RMSNorm / LayerNorm, optionally fused with the residual add that precedes them.

Functional API (every function takes ``backend="auto" | "triton" | "torch"``):

- :func:`rms_norm` ``(x, weight, eps, weight_offset=0.0)`` -> normed
- :func:`add_rms_norm` ``(x, residual, weight, eps, weight_offset=0.0)`` -> ``(normed, x + residual)``
- :func:`layer_norm` ``(x, weight, bias, eps)`` -> normed
- :func:`add_layer_norm` ``(x, residual, weight, bias, eps)`` -> ``(normed, x + residual)``

Inputs: any leading dims, normalised over the last (any size up to 65536, not only powers of two), float32,
float16 or bfloat16, any strides (a last dim with unit stride is read in place, otherwise copied once).
Outputs are new contiguous tensors: ``normed`` in ``x.dtype``, the new residual in
``result_type(x, residual)``. Math is float32. The references are in :mod:`policyinject.kernels.reference`.

The kernel reads each input once and writes each output once (``add_*``: read x, residual; write normed,
x + residual). Inference only: the kernel's outputs carry no autograd graph.

Example:
    >>> import torch
    >>> from policyinject.kernels.norms import add_rms_norm
    >>> x, res, w = torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.randn(10)
    >>> y, s = add_rms_norm(x, res, w, 1e-6, backend="torch")
    >>> y.shape, torch.allclose(s, x + res)
    (torch.Size([2, 3, 10]), True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from policyinject.errors import UnsupportedError
from policyinject.kernels import reference
from policyinject.kernels._common import (
    as_rows,
    cdiv,
    check_launch,
    device_guard,
    load_kernel_module,
    next_pow2,
    sm_count,
    use_triton,
)

__all__ = ["rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "NormConfig", "norm_config", "launch_norm"]

#: Largest hidden size the single-tile kernel handles (a row lives in registers).
MAX_HIDDEN = 65536


@dataclass(frozen=True)
class NormConfig:
    """Launch parameters of the norm kernel.

    ``block_m`` rows per tile; ``num_programs`` grid size (``None``: one program per tile; fewer programs walk
    the tiles with a grid stride and load the weight once); ``num_warps``/``num_stages`` as in Triton.
    """

    block_m: int
    num_warps: int
    num_programs: Optional[int] = None
    num_stages: int = 1
    stream: bool = False


def norm_config(m: int, n: int, sms: int = 132) -> NormConfig:
    """Default launch parameters for ``m`` rows of ``n`` elements on a card with ``sms`` SMs.

    A tile holds about 8192 elements (several rows when ``n`` is small: 2 rows at n=4096), shrunk until there
    are at least two tiles per SM so small batches still spread over the chip; 8 warps for tiles of 4096+
    elements (16 elements per thread: two 16-byte loads of bf16), 4 below, 16 from 16384.

    Example:
        >>> norm_config(4096, 4096)
        NormConfig(block_m=2, num_warps=8, num_programs=None, num_stages=1, stream=False)
        >>> norm_config(1, 4096).block_m
        1
    """
    block_n = next_pow2(n)
    block_m = max(1, 8192 // block_n)
    block_m = min(block_m, next_pow2(max(m, 1)))
    while block_m > 1 and cdiv(m, block_m) < 2 * sms:
        block_m //= 2
    tile = block_m * block_n
    num_warps = 16 if tile >= 16384 else 8 if tile >= 4096 else 4 if tile >= 512 else 2
    return NormConfig(block_m=block_m, num_warps=num_warps)


@functools.lru_cache(maxsize=1024)
def _default_config(m: int, n: int, device: torch.device) -> NormConfig:
    """:func:`norm_config` for ``device``'s SM count, memoised (host time: decode calls the norms with the same
    shapes every step, and the heuristic plus the SM-count query are a few microseconds per call)."""
    return norm_config(m, n, sm_count(device))


def _check_vec(name: str, t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n} (the last dim of x)")
    return t.reshape(n).contiguous()


def launch_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    weight_offset: float,
    is_rms: bool,
    config: Optional[NormConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the Triton norm kernel; returns ``(normed, new_residual or None)``. ``config=None`` uses
    :func:`norm_config`. Used by the public functions and by the benchmark's tuning sweep."""
    mod = load_kernel_module("_norms_triton")
    name = "rms_norm" if is_rms else "layer_norm"
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_launch(name, mod.norm_fwd_kernel, x, residual, weight, bias)
    n = x.shape[-1]
    if n > MAX_HIDDEN:
        raise UnsupportedError(f"{name}: hidden size {n} > {MAX_HIDDEN} is not supported by the Triton kernel")
    w = _check_vec("weight", weight, n)
    b = _check_vec("bias", bias, n)
    x2 = as_rows(x)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = None
    r2 = None
    if residual is not None:
        r2 = as_rows(residual)
        s = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    if m == 0 or n == 0:
        return y, s
    y2 = y.view(-1, n)
    s2 = s.view(-1, n) if s is not None else None
    cfg = config or _default_config(m, n, x.device)
    tiles = cdiv(m, cfg.block_m)
    grid = (min(tiles, cfg.num_programs) if cfg.num_programs else tiles,)
    with device_guard(x.device):
        mod.norm_fwd_kernel[grid](
            x2,
            r2 if r2 is not None else x2,
            w if w is not None else x2,
            b if b is not None else x2,
            y2,
            s2 if s2 is not None else y2,
            m,
            n,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            y2.stride(0),
            s2.stride(0) if s2 is not None else 0,
            float(eps),
            float(weight_offset),
            IS_RMS=is_rms,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=w is not None,
            HAS_BIAS=b is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_N=next_pow2(n),
            STREAM=cfg.stream,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return y, s


def rms_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """RMSNorm over the last dim, scaled by ``(weight_offset + weight)``; see the module docstring.

    Example:
        >>> import torch
        >>> y = rms_norm(torch.randn(3, 5), torch.ones(5), 1e-6, backend="torch")
        >>> torch.allclose(y.pow(2).mean(-1), torch.ones(3), atol=1e-3)
        True
    """
    if not use_triton(backend, x, weight):
        return reference.rms_norm(x, weight, eps, weight_offset)
    return launch_norm(x, None, weight, None, eps, weight_offset, is_rms=True)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float = 1e-6,
    weight_offset: float = 0.0,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` then RMSNorm of ``s``; returns ``(normed, s)`` in one pass.

    Example:
        >>> import torch
        >>> x, r = torch.randn(4, 6), torch.randn(4, 6)
        >>> y, s = add_rms_norm(x, r, torch.ones(6), backend="torch")
        >>> torch.allclose(y, rms_norm(x + r, torch.ones(6), backend="torch"))
        True
    """
    if not use_triton(backend, x, residual, weight):
        return reference.add_rms_norm(x, residual, weight, eps, weight_offset)
    y, s = launch_norm(x, residual, weight, None, eps, weight_offset, is_rms=True)
    assert s is not None
    return y, s


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dim (like ``nn.LayerNorm`` with a 1-d ``normalized_shape``).

    Example:
        >>> import torch
        >>> x = torch.randn(3, 7)
        >>> y = layer_norm(x, None, None, backend="torch")
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (7,)), atol=1e-6)
        True
    """
    if not use_triton(backend, x, weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    return launch_norm(x, None, weight, bias, eps, 0.0, is_rms=False)[0]


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` then LayerNorm of ``s``; returns ``(normed, s)`` in one pass.

    Example:
        >>> import torch
        >>> x, r = torch.randn(2, 5), torch.randn(2, 5)
        >>> y, s = add_layer_norm(x, r, None, None, backend="torch")
        >>> torch.allclose(s, x + r)
        True
    """
    if not use_triton(backend, x, residual, weight, bias):
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    y, s = launch_norm(x, residual, weight, bias, eps, 0.0, is_rms=False)
    assert s is not None
    return y, s
