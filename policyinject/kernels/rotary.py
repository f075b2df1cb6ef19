"""Rotary position embedding of q and k in one launch.

Functional API::

    rotary(q, k, cos, sin, layout="half", rotary_dim=None, *, inplace=False, backend="auto") -> (q_out, k_out)

- ``q``: ``[B, Hq, T, D]``, ``k``: ``[B, Hkv, T, D]`` (any strides with a unit-stride last dim, e.g. the
  ``view(B, T, H, D).transpose(1, 2)`` of a projection output: no copy is made). Same dtype for q and k.
- ``cos``/``sin``: ``[B, T, R]`` (what HF's ``LlamaRotaryEmbedding`` returns, ``R = D`` there, built as
  ``cat(freqs, freqs)``), ``[1, T, R]`` or ``[T, R]``; any float dtype; ``R = rotary_dim <= D``, even. Only the
  first ``R`` dims of each head rotate (GPT-NeoX / Phi partial rotary); the rest pass through.
- ``layout="half"``: ``x * cos + rotate_half(x) * sin`` (Llama, NeoX, HF default).
  ``layout="interleaved"``: ``x * cos + rotate_every_two(x) * sin`` (GPT-J); there cos/sin follow the
  interleaved convention ``cos[..., 2i] == cos[..., 2i+1]`` (see :func:`reference.interleave_cos_sin`).
- ``inplace=False`` (default): returns new tensors with q's / k's memory layout (``empty_like``).
  ``inplace=True``: overwrites q and k (each element is read before it is written by the same program) and
  returns them; the pass-through dims are not touched.

Math is float32, results are cast to q's dtype once. Reference: :func:`policyinject.kernels.reference.rotary`.

Example:
    >>> import torch
    >>> from policyinject.kernels.rotary import rotary
    >>> q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    >>> pos = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    >>> emb = torch.cat((pos, pos), dim=-1)               # [T, D], HF's cat(freqs, freqs)
    >>> qo, ko = rotary(q, k, emb.cos(), emb.sin(), backend="torch")
    >>> torch.allclose(qo.norm(dim=-1), q.norm(dim=-1), atol=1e-5)   # a rotation keeps norms
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from policyinject.kernels import reference
from policyinject.kernels._common import (
    cdiv,
    check_launch,
    device_guard,
    load_kernel_module,
    next_pow2,
    sm_count,
    use_triton,
)

__all__ = ["rotary", "RotaryConfig", "rotary_config", "launch_rotary"]


@dataclass(frozen=True)
class RotaryConfig:
    """Launch parameters: ``block_h`` heads per program, ``num_warps``."""

    block_h: int
    num_warps: int = 4


def rotary_config(n_tokens: int, hq: int, hkv: int, rotary_dim: int, sms: int = 132) -> RotaryConfig:
    """Default launch parameters.

    The largest power-of-two ``block_h`` (at most 4096 elements per program) whose padding of Hq and Hkv
    to multiples of it stays within 25% (padded lanes cost threads, not bytes), halved while there are fewer
    than 4 programs per SM (decode); warps so that each thread moves about 8 elements of each half-tile.

    Example:
        >>> rotary_config(4096, 32, 8, 128)
        RotaryConfig(block_h=16, num_warps=4)
        >>> rotary_config(1, 32, 8, 128).block_h
        1
    """
    block_half = next_pow2(max(rotary_dim // 2, 1))
    cap = max(1, 2048 // block_half)
    limit = min(cap, next_pow2(max(hq, hkv)))
    best = 1
    bh = 1
    while bh <= limit:
        padded = cdiv(hq, bh) * bh + cdiv(hkv, bh) * bh
        if padded <= 1.25 * (hq + hkv):
            best = bh
        bh *= 2

    def programs(b: int) -> int:
        return n_tokens * (cdiv(hq, b) + cdiv(hkv, b))

    while best > 1 and programs(best) < 4 * sms:
        best //= 2
    # about 8 elements (one 16-byte bf16 access) per thread and half-tile
    num_warps = max(1, min(4, best * block_half // 256))
    return RotaryConfig(block_h=best, num_warps=num_warps)


@functools.lru_cache(maxsize=512)
def _default_config(n_tokens: int, hq: int, hkv: int, rotary_dim: int, device: torch.device) -> RotaryConfig:
    """:func:`rotary_config` for ``device``'s SM count, memoised: a decode step calls rotary once per layer
    with the same shapes, and the heuristic's search plus the SM-count query cost a few microseconds of host
    time per call (the kernel itself takes about as long at decode sizes)."""
    return rotary_config(n_tokens, hq, hkv, rotary_dim, sm_count(device))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "half",
    rotary_dim: Optional[int] = None,
    inplace: bool = False,
    config: Optional[RotaryConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the Triton rotary kernel (see :func:`rotary`); ``config=None`` uses :func:`rotary_config`."""
    r = reference.check_rotary_args(q, k, cos, sin, layout, rotary_dim)
    mod = load_kernel_module("_rotary_triton")
    check_launch("rotary", mod.rotary_kernel, q, k, cos, sin)
    if q.dtype != k.dtype:
        raise ValueError(f"rotary: q ({q.dtype}) and k ({k.dtype}) must have the same dtype")
    if inplace:
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("rotary(inplace=True) needs q and k with a unit-stride last dim")
        qi, ki, qo, ko = q, k, q, k
    else:
        qi, ki = _unit_last(q), _unit_last(k)
        qo, ko = torch.empty_like(qi), torch.empty_like(ki)
        if qo.stride(-1) != 1 or ko.stride(-1) != 1:  # pragma: no cover - exotic layouts
            qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    c, s = _unit_last(cos), _unit_last(sin)
    if c.stride() != s.stride():
        c, s = c.contiguous(), s.contiguous()
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    cst = c.stride()
    if c.dim() == 2:
        sc_b, sc_t = 0, cst[0]
    else:
        sc_b = cst[0] if c.shape[0] > 1 else 0
        sc_t = cst[1]
    if b * t == 0 or hq + hkv == 0:
        return qo, ko
    cfg = config or _default_config(b * t, hq, hkv, r, q.device)
    groups = cdiv(hq, cfg.block_h) + cdiv(hkv, cfg.block_h)
    copy_pass = (not inplace) and r < d
    sq, sk, sqo, sko = qi.stride(), ki.stride(), qo.stride(), ko.stride()
    with device_guard(q.device):
        mod.rotary_kernel[(b * t, groups)](
            qi, ki, qo, ko, c, s,
            t, hq, hkv, r // 2, d,
            sq[0], sq[1], sq[2],
            sk[0], sk[1], sk[2],
            sqo[0], sqo[1], sqo[2],
            sko[0], sko[1], sko[2],
            sc_b, sc_t,
            INTERLEAVED=layout == "interleaved",
            COPY_PASS=copy_pass,
            BLOCK_H=cfg.block_h,
            BLOCK_HALF=next_pow2(r // 2),
            BLOCK_PASS=next_pow2(d - r) if copy_pass else 1,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return qo, ko


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "half",
    rotary_dim: Optional[int] = None,
    *,
    inplace: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to q and k; see the module docstring for shapes, layouts and ``inplace``.

    Example:
        >>> import torch
        >>> q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 1, 5, 16)
        >>> cos, sin = torch.ones(2, 5, 8), torch.zeros(2, 5, 8)      # partial rotary, angle 0
        >>> qo, ko = rotary(q, k, cos, sin, rotary_dim=8, backend="torch")
        >>> torch.equal(qo, q) and torch.equal(ko, k)
        True
    """
    if not use_triton(backend, q, k, cos, sin):
        qo, ko = reference.rotary(q, k, cos, sin, layout, rotary_dim)
        if inplace:
            q.copy_(qo)
            k.copy_(ko)
            return q, k
        return qo, ko
    return launch_rotary(q, k, cos, sin, layout, rotary_dim, inplace)
