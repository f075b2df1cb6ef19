"""Activation-aware weight quantization (AWQ, Lin et al. 2023): searched per-input-channel scales, and clipping.

Weights that meet large activations matter most. For linears that share one input ``x`` (q/k/v after the
attention norm, gate/up after the MLP norm, down after up), :func:`search_scales` picks per-input-channel
scales ``s = mean|x|^a / mean|w|^(1-a)`` (normalised to geometric mean 1) over a grid of ``a``, keeping the
``s`` whose quantized ``Q(W diag(s)) diag(s)^-1`` gives the smallest output error ``||x W^T - x Wq^T||`` on
the calibration inputs. ``s = 1`` (plain round to nearest) is always a candidate, so the chosen scales are never
worse than round to nearest on those inputs. The scales are then folded: the linears' weights are multiplied
by ``s`` (columns) and whatever produced ``x`` -- the norm's weight (and bias), or the rows of the preceding
linear -- is divided by ``s``, so the float model computes the same function and only the quantization grid
moves. :func:`search_clip` then shrinks each group's range (the same output-error criterion, per group).

The result is quantized by round to nearest into the usual stored format
(:class:`~policyinject.kernels.quantize.QuantizedWeight`), so every kernel serves it unchanged.

Example:
    >>> import torch
    >>> from policyinject.kernels.quantize import quantize_weight, dequantize_weight
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 8.0, 128)   # a few loud input channels
    >>> w = torch.randn(64, 128, generator=g)
    >>> s = search_scales(x, [w], num_bits=4, group_size=32, symmetric=False)
    >>> qw = awq_quantize_weight(w * s, x / s, 4, 32, symmetric=False)
    >>> err = lambda deq: float((x @ (deq - w).T).norm())
    >>> err(dequantize_weight(qw) / s) < err(dequantize_weight(quantize_weight(w, 4, 32, symmetric=False)))
    True
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.quantize import QuantizedWeight, dequantize_weight, group_scale_zero, quantize_weight

__all__ = ["search_scales", "search_clip", "awq_quantize_weight", "fake_quantize"]


def fake_quantize(w: torch.Tensor, num_bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``dequantize(quantize(w))`` by round to nearest, float32.

    Example:
        >>> w = torch.randn(4, 32)
        >>> float((fake_quantize(w, 8, 32, True) - w).abs().max()) < float(w.abs().max()) / 100
        True
    """
    return dequantize_weight(quantize_weight(w, num_bits, group_size, symmetric)).to(torch.float32)


def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    num_bits: int,
    group_size: int,
    symmetric: bool,
    *,
    grid: int = 20,
) -> torch.Tensor:
    """Per-input-channel scales ``[K]`` for linears ``weights`` (each ``[N_i, K]``) sharing the input ``x`` ``[T, K]``.

    Returns all ones when no candidate beats plain round to nearest on ``x``.

    Example:
        >>> x, w = torch.randn(64, 32), torch.randn(8, 32)
        >>> s = search_scales(x, [w], 4, 32, True)
        >>> s.shape, bool((s > 0).all())
        (torch.Size([32]), True)
    """
    x = x.to(torch.float32)
    ws = [w.detach().to(torch.float32) for w in weights]
    k = x.shape[1]
    x_mean = x.abs().mean(dim=0)
    wcat = torch.cat(ws, dim=0)
    wg = wcat.abs().reshape(wcat.shape[0], k // group_size, group_size)
    w_mean = (wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(wcat.shape[0], k).mean(dim=0)
    refs = [x @ w.T for w in ws]

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for w, ref in zip(ws, refs):
            deq = fake_quantize(w * s, num_bits, group_size, symmetric) / s
            total += float(((x @ deq.T) - ref).pow(2).sum())
        return total

    best_s = torch.ones(k, dtype=torch.float32, device=x.device)
    best = error(best_s)
    for i in range(grid):
        a = i / grid
        s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not bool(torch.isfinite(s).all()):
            continue
        e = error(s)
        if e < best:
            best, best_s = e, s
    return best_s


def search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    num_bits: int,
    group_size: int,
    symmetric: bool,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
    rows_per_block: int = 1024,
) -> torch.Tensor:
    """``w`` with each group's values clamped to its range shrunk by the ratio (1.0 down to ``1 - max_shrink``)
    that minimises that group's output error ``sum_t (x_t,g . (w_g - Q(w_g)))^2`` on ``x`` ``[T, K]``.

    Ratio 1.0 (no clipping) is a candidate, so no group's error exceeds round to nearest's.

    Example:
        >>> w, x = torch.randn(8, 64), torch.randn(128, 64)
        >>> wc = search_clip(w, x, 4, 32, False)
        >>> wc.shape == w.shape and bool((wc.abs() <= w.abs() + 1e-6).all())
        True
    """
    w = w.detach().to(torch.float32)
    n, k = w.shape
    groups = k // group_size
    xg = x.to(torch.float32).reshape(-1, groups, group_size)
    gram = torch.einsum("tgi,tgj->gij", xg, xg)  # per-group Gram blocks [G, g, g]
    out = torch.empty_like(w)
    for r0 in range(0, n, rows_per_block):
        wb = w[r0:r0 + rows_per_block].reshape(-1, groups, group_size)
        wmax, wmin = wb.amax(dim=-1, keepdim=True), wb.amin(dim=-1, keepdim=True)
        best_err = torch.full(wb.shape[:2], float("inf"), device=w.device)
        best_w = wb.clone()
        for i in range(grid):
            ratio = 1.0 - max_shrink * i / grid
            if symmetric:
                m = torch.maximum(wmax.abs(), wmin.abs()) * ratio
                lo, hi = -m, m
            else:
                lo, hi = wmin * ratio, wmax * ratio
            wc = torch.minimum(torch.maximum(wb, lo), hi)
            s, z = group_scale_zero(wc, num_bits, symmetric)
            deq = _quant_dequant(wc, s.to(torch.float32), z, num_bits, symmetric)
            d = wb - deq
            err = torch.einsum("rgi,gij,rgj->rg", d, gram, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_w = torch.where(better[..., None], wc, best_w)
        out[r0:r0 + rows_per_block] = best_w.reshape(-1, k)
    return out


def _quant_dequant(w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], num_bits: int,
                   symmetric: bool) -> torch.Tensor:
    from ..kernels.quantize import quantize_groups

    q = quantize_groups(w, s, z, num_bits, symmetric)
    return q * s[..., None] if symmetric else (q - z[..., None]) * s[..., None]


def awq_quantize_weight(
    w: torch.Tensor,
    x: torch.Tensor,
    num_bits: int,
    group_size: int,
    symmetric: bool,
    *,
    clip: bool = True,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` (already scaled) after :func:`search_clip` on its input ``x``.

    Example:
        >>> w, x = torch.randn(8, 64), torch.randn(128, 64)
        >>> awq_quantize_weight(w, x, 4, 32, True).scales.shape
        torch.Size([8, 2])
    """
    w = w.detach().to(torch.float32)
    if clip:
        w = search_clip(w, x, num_bits, group_size, symmetric)
    return quantize_weight(w, num_bits, group_size, symmetric)
