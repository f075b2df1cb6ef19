"""Mixture-of-experts kernels: routing, token alignment by expert, and the fused expert MLP.

Functional API (``backend="auto" | "triton" | "torch"``)::

    route(logits, top_k, order="softmax_topk", normalize=False)     # -> (weights fp32 [T, k], ids [T, k])
    align_tokens(ids, num_experts, block_m)                          # -> AlignedTokens (device tensors)
    fused_moe(x, w13, w2, ids, weights, activation="silu", ...)      # -> [T, H]

Expert weights use one canonical layout: ``w13 [E, 2I, H]`` (gate rows then up rows; ``[E, I, H]`` for a
plain, ungated expert) and ``w2 [E, H, I]`` -- transformers 5's ``gate_up_proj``/``down_proj`` as they are --
with optional biases ``b13 [E, 2I]`` and ``b2 [E, H]``. Expert ``e`` computes
``down(act(gate) * up)`` (or ``down(act(up))``), and token ``t``'s output is ``sum_j weights[t, j] *
expert_{ids[t, j]}(x[t])``.

Pairs whose id is outside ``[0, E)`` contribute nothing on every path (expert parallelism marks the experts
of other ranks with ``-1``). Nothing here synchronises with the host or branches on data (CUDA-graph safe),
except
``fused_moe(..., dispatch="grouped")`` on the PyTorch path, which reads the per-expert token counts once to run
each expert on its own tokens only (the fast eager path on a CPU). The Triton path picks, from the static
shape alone, a GEMV per (token, expert) pair that reads only the selected experts' weights (few tokens:
decode) or a grouped GEMM over tokens sorted by expert (prefill).

Example:
    >>> import torch
    >>> x = torch.randn(3, 8)
    >>> w13, w2 = torch.randn(4, 2 * 6, 8), torch.randn(4, 8, 6)
    >>> weights, ids = route(torch.randn(3, 4), top_k=2, normalize=True)
    >>> out = fused_moe(x, w13, w2, ids, weights, backend="torch")
    >>> one = lambda e, v: w2[e] @ (torch.nn.functional.silu(w13[e, :6] @ v) * (w13[e, 6:] @ v))
    >>> ref = torch.stack([sum(weights[t, j] * one(ids[t, j], x[t]) for j in range(2)) for t in range(3)])
    >>> torch.allclose(out, ref, atol=1e-4)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import attrs

import torch
import torch.nn.functional as F

from policyinject.kernels._common import (cdiv, check_launch, device_guard, floor_pow2, is_interpreted,
                                          load_kernel_module, use_triton)

__all__ = [
    "ACT_CODES", "AlignedTokens", "MoEConfig", "QuantizedExperts", "quantize_experts", "dequantize_experts", "align_tokens", "expert_act", "fused_moe", "moe_config",
    "moe_reference", "route", "route_fused", "gemv_warps",
]

#: Activation codes of the Triton kernels (``swiglu_clamped`` is GPT-OSS's clamped SwiGLU).
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "swiglu_clamped": 4}


@attrs.frozen(eq=False)
class QuantizedExperts:
    """Every expert's ``[N, K]`` weight quantized in the format of :mod:`policyinject.kernels.quantize`,
    stacked: ``qweight [E, N, K]`` int8 or ``[E, N, K // 2]`` uint8 (int4), ``scales``/``zeros``
    ``[E, N, K // group_size]``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    num_bits: int
    group_size: int
    in_features: int

    @property
    def shape(self) -> Tuple[int, int, int]:
        """The float weight's shape ``(E, N, K)``."""
        return (self.qweight.shape[0], self.qweight.shape[1], self.in_features)

    def nbytes(self) -> int:
        parts = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return sum(t.numel() * t.element_size() for t in parts)


def quantize_experts(w: torch.Tensor, num_bits: int = 8, group_size: Optional[int] = None,
                     symmetric: bool = True) -> QuantizedExperts:
    """Quantize ``w [E, N, K]`` expert by expert with :func:`policyinject.kernels.quantize.quantize_weight`.

    Example:
        >>> q = quantize_experts(torch.randn(3, 8, 64), num_bits=4, group_size=32)
        >>> q.qweight.shape, q.scales.shape, q.shape
        (torch.Size([3, 8, 32]), torch.Size([3, 8, 2]), (3, 8, 64))
    """
    from policyinject.kernels.quantize import quantize_weight

    parts = [quantize_weight(w[e], num_bits, group_size, symmetric) for e in range(w.shape[0])]
    zeros = None if parts[0].zeros is None else torch.stack([p.zeros for p in parts])
    return QuantizedExperts(torch.stack([p.qweight for p in parts]), torch.stack([p.scales for p in parts]), zeros,
                            num_bits, parts[0].group_size, w.shape[2])


def dequantize_experts(q: QuantizedExperts, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``[E, N, K]`` float weights a :class:`QuantizedExperts` stands for.

    Example:
        >>> w = torch.randn(2, 4, 32)
        >>> bool((dequantize_experts(quantize_experts(w)) - w).abs().max() < w.abs().max() / 100)
        True
    """
    from policyinject.kernels.quantize import QuantizedWeight, dequantize_weight

    e, n, k = q.shape
    return torch.stack([dequantize_weight(QuantizedWeight(
        q.qweight[i], q.scales[i], None if q.zeros is None else q.zeros[i], q.num_bits, q.group_size, k, n), dtype)
        for i in range(e)])


Weights = Union[torch.Tensor, QuantizedExperts]


def _float(w: Weights, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_experts(w, dtype) if isinstance(w, QuantizedExperts) else w


def route(logits: torch.Tensor, top_k: int, order: str = "softmax_topk",
          normalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(weights, ids)``, both ``[T, top_k]``; weights are float32.

    ``order="softmax_topk"``: ``topk(softmax(logits))`` (softmax in float32 over all experts), then with
    ``normalize`` the k weights are divided by their sum (Mixtral always, Qwen/OLMoE by ``norm_topk_prob``).
    ``order="topk_softmax"``: ``softmax(topk(logits))`` over the selected logits (GPT-OSS).

    Example:
        >>> w, i = route(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2, normalize=True)
        >>> i.tolist(), round(float(w.sum()), 6)
        ([[1, 2]], 1.0)
    """
    if order == "softmax_topk":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    if order == "topk_softmax":
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values.float(), dim=-1), ids
    raise ValueError(f"route: order must be 'softmax_topk' or 'topk_softmax', got {order!r}")


def route_fused(logits: torch.Tensor, top_k: int, order: str = "softmax_topk", normalize: bool = False,
                round_to: Optional[torch.dtype] = None, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` in one Triton launch per call (softmax, top-k and normalisation fused; decode runs one
    per MoE layer per step, where the separate PyTorch kernels cost more than the routing): ``(weights
    float32 [T, k], ids int32 [T, k])``, the weights rounded through ``round_to`` (the model's dtype, when it
    keeps routing weights in it). Falls back to :func:`route` off the Triton path (ids int64 there).

    Example:
        >>> w, i = route_fused(torch.tensor([[0.0, 2.0, 1.0]]), top_k=2, normalize=True, backend="torch")
        >>> i.tolist(), round(float(w.sum()), 6)
        ([[1, 2]], 1.0)
    """
    if order not in ("softmax_topk", "topk_softmax"):
        raise ValueError(f"route: order must be 'softmax_topk' or 'topk_softmax', got {order!r}")
    num_experts = logits.shape[-1]
    if logits.dim() != 2 or not use_triton(backend, logits) or num_experts > 1024 or top_k > num_experts:
        weights, ids = route(logits, top_k, order, normalize)
        if round_to is not None:
            weights = weights.to(round_to).to(torch.float32)
        return weights, ids
    mod = load_kernel_module("_moe_triton")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    t = logits.shape[0]
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    block_e = 1 << max(num_experts - 1, 1).bit_length()
    with device_guard(logits.device):
        mod.moe_route_kernel[(t,)](logits, weights, ids, num_experts, logits.stride(0), TOPK=top_k,
                                   SOFTMAX_FIRST=order == "softmax_topk", NORMALIZE=bool(normalize),
                                   ROUND_BF16=round_to == torch.bfloat16, ROUND_FP16=round_to == torch.float16,
                                   BLOCK_E=block_e, TOPK_P2=1 << max(top_k - 1, 0).bit_length(),
                                   num_warps=1 if block_e <= 256 else 4)
    return weights, ids


def expert_act(h: torch.Tensor, activation: str, gated: bool, alpha: float = 1.702,
               limit: float = 7.0) -> torch.Tensor:
    """The expert's activation on ``[..., 2I]`` (gated: gate then up) or ``[..., I]`` (plain).

    Example:
        >>> expert_act(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "silu", gated=True)
        tensor([[0.0000, 1.4621]])
    """
    if activation == "swiglu_clamped":
        g, u = h.chunk(2, dim=-1)
        g = g.clamp(max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    fn = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
          "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}.get(activation)
    if fn is None:
        raise ValueError(f"unknown expert activation {activation!r}; expected one of {sorted(ACT_CODES)}")
    if not gated:
        return fn(h)
    g, u = h.chunk(2, dim=-1)
    return fn(g) * u


def _one_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, b13: Optional[torch.Tensor],
                b2: Optional[torch.Tensor], activation: str, gated: bool, alpha: float, limit: float) -> torch.Tensor:
    return F.linear(expert_act(F.linear(x, w13, b13), activation, gated, alpha, limit), w2, b2)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  activation: str = "silu", gated: bool = True, b13: Optional[torch.Tensor] = None,
                  b2: Optional[torch.Tensor] = None, alpha: float = 1.702, limit: float = 7.0,
                  dispatch: str = "dense") -> torch.Tensor:
    """The plain-PyTorch expert MLP (``x [T, H]`` -> ``[T, H]``), accumulating in ``x.dtype`` in expert order.

    ``dispatch="dense"``: every expert runs on every token and unselected rows are masked out with
    ``torch.where`` (no host sync, no data-dependent control flow; ``E / k`` times the FLOPs).
    ``dispatch="grouped"``: tokens sorted by expert, each expert runs on its own rows (reads the counts on the
    host once). Each routed product is ``(expert(x) * weight).to(x.dtype)``, as Hugging Face's experts do.
    Pairs whose id is outside ``[0, E)`` contribute nothing (expert parallelism marks experts held by other
    ranks that way).

    Example:
        >>> x, w13, w2 = torch.randn(5, 8), torch.randn(3, 12, 8), torch.randn(3, 8, 6)
        >>> w, i = route(torch.randn(5, 3), 2)
        >>> torch.allclose(moe_reference(x, w13, w2, i, w), moe_reference(x, w13, w2, i, w, dispatch="grouped"),
        ...                atol=1e-5)
        True
    """
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)
    if dispatch == "dense":
        for e in range(num_experts):
            hit = ids == e                                            # [T, k]
            coef = torch.where(hit, weights, torch.zeros_like(weights)).sum(dim=-1, keepdim=True)
            y = _one_expert(x, w13[e], w2[e], None if b13 is None else b13[e], None if b2 is None else b2[e],
                            activation, gated, alpha, limit)
            out = out + torch.where(hit.any(dim=-1, keepdim=True), (y * coef).to(x.dtype), torch.zeros_like(out))
        return out
    if dispatch != "grouped":
        raise ValueError(f"moe_reference: dispatch must be 'dense' or 'grouped', got {dispatch!r}")
    top_k = ids.shape[-1]
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    flat = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()[:num_experts]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        tok = slots // top_k
        y = _one_expert(x[tok], w13[e], w2[e], None if b13 is None else b13[e], None if b2 is None else b2[e],
                        activation, gated, alpha, limit)
        out.index_add_(0, tok, (y * weights.reshape(-1)[slots, None]).to(x.dtype))
    return out


@dataclass(frozen=True)
class AlignedTokens:
    """(token, slot) pairs sorted by expert, each expert's run padded to a multiple of ``block_m``.

    ``sorted_ids [max_blocks * block_m]``: flat slot indices ``t * k + j`` (``T * k`` marks padding);
    ``block_expert [max_blocks]``: the expert of each block (``num_experts`` past the last used block);
    ``max_blocks`` is a static bound (``cdiv(T*k, block_m) + min(T*k, E)``), so shapes depend on sizes only.
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    max_blocks: int


def align_tokens(ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """Sort the routed (token, slot) pairs by expert on the device, padding each expert to ``block_m`` rows.

    Example:
        >>> a = align_tokens(torch.tensor([[2, 0], [2, 1]]), num_experts=3, block_m=2)
        >>> a.sorted_ids.tolist(), a.block_expert.tolist()
        ([1, 4, 3, 4, 0, 2, 4, 4, 4, 4], [0, 1, 2, 3, 3])
    """
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    # ids outside [0, E) (experts of other ranks under expert parallelism) are left out: key E sorts them last
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    ones = torch.ones_like(key)
    counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, key, ones)
    counts = counts_all[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(key, stable=True)
    sorted_e = key[order]
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts_all, 0) - counts_all)[sorted_e]
    max_blocks = -(-n // block_m) + min(n, num_experts)
    # one spare slot past the end takes every left-out pair; it is cut off below
    sorted_ids = torch.full((max_blocks * block_m + 1,), n, dtype=torch.int32, device=flat.device)
    dest = torch.where(sorted_e < num_experts, starts[sorted_e.clamp(max=num_experts - 1)] + rank,
                       torch.full_like(rank, max_blocks * block_m))
    sorted_ids[dest] = order.to(torch.int32)
    sorted_ids = sorted_ids[:max_blocks * block_m]
    block_starts = torch.arange(max_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(ends, block_starts, right=True).to(torch.int32)
    return AlignedTokens(sorted_ids, block_expert, block_m, max_blocks)


@dataclass(frozen=True)
class MoEConfig:
    """Launch parameters. ``gemv``: one program per (pair, column block) reading only the selected experts
    (decode); otherwise the grouped GEMM with ``[block_m, block_n, block_k]`` tiles over sorted tokens.
    ``block_n_down``: the GEMV down kernel's column block (default ``block_n``); ``down_per_pair``: the GEMV
    down kernel runs one program per (pair, column block) and the ``k`` float32 partials of a token are summed
    afterwards (``k`` times the programs, one more small kernel)."""

    gemv: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    block_n_down: Optional[int] = None
    down_per_pair: bool = False


#: Up to this many tokens the GEMV path runs (each (token, expert) pair streams its expert's rows once).
GEMV_MAX_TOKENS = 8
#: With int8/int4 experts, the GEMV path also runs up to this many tokens while the routed pairs are sparse
#: (at most two per expert on average): it reads at most about twice the selected experts' bytes, where the
#: grouped GEMM dequantizes a padded tile per pair.
QUANT_GEMV_MAX_TOKENS = 64


def _pow2_floor(v: float) -> int:
    """:func:`~policyinject.kernels._common.floor_pow2` of a float ratio (1 below 2)."""
    return floor_pow2(max(int(v), 1))


def moe_config(tokens: int, hidden: int, inter: int, interpret: bool = False, top_k: int = 2,
               num_experts: int = 8, programs: int = 512, quantized: bool = False,
               weight_bits: int = 16) -> MoEConfig:
    """Default launch parameters from the static shape.

    Up to :data:`GEMV_MAX_TOKENS` tokens (with ``quantized`` experts, up to :data:`QUANT_GEMV_MAX_TOKENS`
    while there are at most two routed pairs per expert), the GEMV pair; its column blocks are sized so that each kernel
    has about ``programs`` programs (several per SM: one program per SM cannot keep enough loads in flight
    to stream its rows at the copy rate), between 4 and 32 rows; the down kernel runs one program per routed
    pair (``down_per_pair``) and about four times as many programs, with wider blocks for ``weight_bits`` 8
    and 4 (fewer bytes per row). Above, the grouped GEMM; its row block
    follows the expected tokens per expert (``tokens * top_k / num_experts``): 16 for batched decode (a
    64-row block would be mostly padding, multiplied all the same), 64 for long prompts.

    Example:
        >>> moe_config(1, 4096, 14336).gemv, moe_config(128, 4096, 14336).gemv
        (True, False)
        >>> c = moe_config(1, 2048, 768, top_k=8, num_experts=128); c.block_n, c.block_n_down, c.down_per_pair
        (8, 8, True)
        >>> moe_config(1, 4096, 14336).block_n_down, moe_config(1, 4096, 14336, weight_bits=8).block_n_down
        (4, 8)
        >>> moe_config(16, 2048, 768, top_k=8, num_experts=128).block_m, moe_config(2048, 4096, 14336).block_m
        (16, 64)
    """
    per_expert = tokens * top_k / max(num_experts, 1)
    gemv = tokens <= GEMV_MAX_TOKENS or (quantized and tokens <= QUANT_GEMV_MAX_TOKENS and per_expert <= 2)
    if gemv:
        if interpret:
            return MoEConfig(gemv=True, block_m=1, block_n=16, block_k=32)
        up = min(32, max(4, _pow2_floor(tokens * top_k * inter / programs)))
        # the down kernel: one program per routed pair and ~4x the programs (the best of a sweep on an H200
        # at Mixtral-8x7B and Qwen3-30B-A3B shapes: benchmarks/moe_kernel_sweep.py)
        down = min(32, max(4, _pow2_floor(tokens * top_k * hidden * (16 // weight_bits) / (4 * programs))))
        return MoEConfig(gemv=True, block_m=1, block_n=up, block_k=256, block_n_down=down,
                         down_per_pair=top_k > 1)
    if interpret:
        return MoEConfig(gemv=False, block_m=16, block_n=16, block_k=32)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    return MoEConfig(gemv=False, block_m=block_m, block_n=64 if inter >= 64 else 32, block_k=64, num_warps=4)


def _scale_mode(w: "Weights", block_k: int) -> Tuple[int, int, int]:
    """``(SCALE_MODE, NGROUPS, NG)`` of the quantized kernels for ``w`` (see ``_moe_triton._qtiles``): mode 1
    when a K step of ``block_k`` lies inside one group, 2 when it holds ``NG`` whole groups, 0 (per-element
    scales; float weights too) otherwise."""
    if not isinstance(w, QuantizedExperts):
        return 0, 1, 1
    g, k = w.group_size, w.in_features
    groups = cdiv(k, g)
    if k % g == 0 and g % block_k == 0:
        return 1, groups, 1
    if k % g == 0 and block_k % g == 0 and (w.num_bits == 8 or (g % 2 == 0)):
        return 2, groups, block_k // g
    return 0, groups, 1


def gemv_warps(block_n: int, block_k: int, bits: int, cap: int = 4) -> int:
    """Warps of a GEMV program: enough for 16-byte loads over its ``[block_n, block_k]`` weight tile
    (``bits`` per weight), at most ``cap`` -- a small int4 tile on four warps would load 4 bytes per thread.

    Example:
        >>> gemv_warps(32, 256, 16), gemv_warps(4, 256, 8), gemv_warps(4, 256, 4)
        (4, 2, 1)
    """
    per_warp = 32 * 16  # bytes one warp loads with 16-byte loads
    return max(1, min(cap, _pow2_floor(block_n * block_k * bits / 8 / per_warp)))


def fused_moe(x: torch.Tensor, w13: Weights, w2: Weights, ids: torch.Tensor, weights: torch.Tensor,
              activation: str = "silu", *, gated: bool = True, b13: Optional[torch.Tensor] = None,
              b2: Optional[torch.Tensor] = None, alpha: float = 1.702, limit: float = 7.0,
              backend: str = "auto", dispatch: str = "dense", config: Optional[MoEConfig] = None) -> torch.Tensor:
    """The routed expert MLP ``[T, H] -> [T, H]`` (see the module docstring for layouts).

    ``w13``/``w2`` are float tensors or :class:`QuantizedExperts` (int8/int4; the PyTorch path dequantizes
    them to ``x.dtype`` per call, the Triton kernels read the quantized bytes). ``dispatch`` applies to the
    PyTorch path only (:func:`moe_reference`).

    Example:
        >>> x, w13, w2 = torch.randn(2, 8), torch.randn(3, 12, 8), torch.randn(3, 8, 6)
        >>> w, i = route(torch.randn(2, 3), 1)
        >>> fused_moe(x, w13, w2, i, w, backend="torch").shape
        torch.Size([2, 8])
    """
    if activation not in ACT_CODES:
        raise ValueError(f"unknown expert activation {activation!r}; expected one of {sorted(ACT_CODES)}")
    if activation == "swiglu_clamped" and not gated:
        raise ValueError("the 'swiglu_clamped' activation needs gated experts")
    quantized = isinstance(w13, QuantizedExperts) or isinstance(w2, QuantizedExperts)
    if not use_triton(backend, x, *((x,) if quantized else (w13, w2))):
        return moe_reference(x, _float(w13, x.dtype), _float(w2, x.dtype), ids, weights, activation, gated, b13, b2, alpha, limit, dispatch)
    return _launch(x, w13, w2, ids, weights, activation, gated, b13, b2, alpha, limit, config)


def _wargs(w: Weights) -> tuple:
    """``(W, S, Z, G, stride_e, stride_n, stride_se, stride_sn, WBITS, HAS_ZERO)`` for one weight."""
    if isinstance(w, QuantizedExperts):
        z = w.zeros if w.zeros is not None else w.scales
        return (w.qweight, w.scales, z, w.group_size, w.qweight.stride(0), w.qweight.stride(1), w.scales.stride(0),
                w.scales.stride(1), w.num_bits, w.zeros is not None)
    w = w if w.stride(-1) == 1 else w.contiguous()
    return (w, w, w, 1, w.stride(0), w.stride(1), 0, 0, 16, False)


def _launch(x: torch.Tensor, w13: Weights, w2: Weights, ids: torch.Tensor, weights: torch.Tensor,
            activation: str, gated: bool, b13: Optional[torch.Tensor], b2: Optional[torch.Tensor], alpha: float,
            limit: float, config: Optional[MoEConfig]) -> torch.Tensor:
    mod = load_kernel_module("_moe_triton")
    floats = [w.scales if isinstance(w, QuantizedExperts) else w for w in (w13, w2)]
    check_launch("fused_moe", mod.moe_gemv_up_kernel, x, *floats, b13, b2)
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [tokens, hidden], got {tuple(x.shape)}")
    t, hidden = x.shape
    num_experts, rows, k_in = w13.shape
    inter = w2.shape[2]
    if k_in != hidden or tuple(w2.shape[:2]) != (num_experts, hidden) or rows != (2 * inter if gated else inter):
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x "
                         f"{tuple(x.shape)} ({'gated' if gated else 'plain'} experts)")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != t:
        raise ValueError(f"fused_moe: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be [T, k]")
    top_k = ids.shape[1]
    interp = is_interpreted(mod.moe_gemv_up_kernel)
    cfg = config or moe_config(t, hidden, inter, interp, top_k=top_k, num_experts=num_experts,
                               quantized=isinstance(w13, QuantizedExperts) or isinstance(w2, QuantizedExperts),
                               weight_bits=w2.num_bits if isinstance(w2, QuantizedExperts) else 16)
    x = x if x.stride(-1) == 1 else x.contiguous()
    W13, S13, Z13, G13, swe13, swn13, sse13, ssn13, bits13, zero13 = _wargs(w13)
    W2, S2, Z2, G2, swe2, swn2, sse2, ssn2, bits2, zero2 = _wargs(w2)
    ids32 = ids.to(torch.int32).contiguous()
    wts = weights.to(torch.float32).contiguous()
    n_pairs = t * top_k
    h = torch.empty(n_pairs, inter, dtype=x.dtype, device=x.device)
    bias13 = b13 if b13 is not None else x  # never read when HAS_BIAS is off
    bias2 = b2 if b2 is not None else x
    sb13 = 0 if b13 is None else b13.stride(0)
    sb2 = 0 if b2 is None else b2.stride(0)
    up = dict(ACT=ACT_CODES[activation], GATED=gated, UPCAST=interp or x.dtype == torch.float32, WBITS=bits13,
              HAS_ZERO=zero13, HAS_BIAS=b13 is not None)
    down = dict(WBITS=bits2, HAS_ZERO=zero2, HAS_BIAS=b2 is not None)
    mode13, groups13, ng13 = _scale_mode(w13, cfg.block_k)
    mode2, groups2, ng2 = _scale_mode(w2, cfg.block_k)
    with device_guard(x.device):
        if cfg.gemv:
            mod.moe_gemv_up_kernel[(n_pairs, cdiv(inter, cfg.block_n))](
                x, W13, S13, Z13, bias13, ids32, h, hidden, inter, alpha, limit, G13,
                x.stride(0), swe13, swn13, sse13, ssn13, h.stride(0), sb13,
                TOPK=top_k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=hidden % cfg.block_k == 0,
                NGROUPS=groups13, SCALE_MODE=mode13, NG=ng13,
                num_warps=gemv_warps(cfg.block_n, cfg.block_k, bits13, cfg.num_warps), **up)
            bn_down = cfg.block_n_down or cfg.block_n
            per_pair = cfg.down_per_pair and top_k > 1
            out = (torch.empty(n_pairs, hidden, dtype=torch.float32, device=x.device) if per_pair
                   else torch.empty_like(x))
            mod.moe_gemv_down_kernel[(n_pairs if per_pair else t, cdiv(hidden, bn_down))](
                h, W2, S2, Z2, bias2, ids32, wts, out, hidden, inter, G2,
                h.stride(0), swe2, swn2, sse2, ssn2, out.stride(0), sb2,
                TOPK=top_k, BLOCK_N=bn_down, BLOCK_K=cfg.block_k, EVEN_K=inter % cfg.block_k == 0,
                NGROUPS=groups2, SCALE_MODE=mode2, NG=ng2,
                num_warps=gemv_warps(bn_down, cfg.block_k, bits2, cfg.num_warps), PER_PAIR=per_pair, **down)
            return out.view(t, top_k, hidden).sum(dim=1).to(x.dtype) if per_pair else out
        al = align_tokens(ids, num_experts, cfg.block_m)
        mod.moe_gemm_up_kernel[(al.max_blocks, cdiv(inter, cfg.block_n))](
            x, W13, S13, Z13, bias13, al.sorted_ids, al.block_expert, h, hidden, inter, alpha, limit, n_pairs,
            num_experts, G13, groups13, x.stride(0), swe13, swn13, sse13, ssn13, h.stride(0), sb13,
            TOPK=top_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            SCALE_MODE=mode13, NG=ng13, **up)
        # zeros: pairs left out of the alignment (ids outside [0, E)) are never written and add nothing
        y = torch.zeros(n_pairs, hidden, dtype=torch.float32, device=x.device)
        mod.moe_gemm_down_kernel[(al.max_blocks, cdiv(hidden, cfg.block_n))](
            h, W2, S2, Z2, bias2, al.sorted_ids, al.block_expert, wts, y, hidden, inter, n_pairs, num_experts, G2,
            groups2, h.stride(0), swe2, swn2, sse2, ssn2, y.stride(0), sb2,
            UPCAST=up["UPCAST"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, SCALE_MODE=mode2, NG=ng2, **down)
    return y.view(t, top_k, hidden).sum(dim=1).to(x.dtype)


