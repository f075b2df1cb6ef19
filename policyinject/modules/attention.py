"""Injected attention: one fused QKV matmul, rotary on the fused kernel, PyTorch's scaled-dot-product attention.

:class:`InjectedAttention` is built from a layer's :class:`~policyinject.policy.AttentionSpec` and the layer
instance. Separate q/k/v projections are concatenated once (:func:`~policyinject.modules.fused_linear.fuse_linears`);
a fused projection (GPT-2 ``c_attn``, NeoX/Falcon ``query_key_value``, Phi-3 ``qkv_proj``) is kept and split
per call by views following its :class:`~policyinject.policy.QKVLayout`. The output projection is the
original module (converted to ``nn.Linear`` if it was a ``Conv1D``).

Three entry points:

- :meth:`InjectedAttention.project` ``(x, cos, sin) -> q, k, v`` as ``[B, H, T, D]``, after the per-head
  q/k norms and rotary;
- :meth:`InjectedAttention.output` ``(attn [B, Hq, T, D]) -> [B, T, hidden]``;
- ``forward(...)``: the Hugging Face attention call (same arguments as the replaced module, returns
  ``(output, None)``), used where a block is injected submodule by submodule.

:func:`sdpa` is the attention itself: causal masks by SDPA's ``is_causal`` when no mask is given, GQA through
``enable_gqa=True`` (torch >= 2.5) without repeating K/V; a single-token step with a mask packs the query
heads of each KV group into the query-length axis instead, so no K/V is repeated there either.

Example:
    >>> import torch
    >>> q = torch.randn(1, 4, 3, 8); k = torch.randn(1, 2, 3, 8); v = torch.randn(1, 2, 3, 8)
    >>> out = sdpa(q, k, v, None, causal=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    >>> torch.allclose(out, ref, atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import PolicyError
from ..policy.model import QKNormScope, QKVLayout, read_size, read_value
from . import _ops
from ._hf import CallSignature, find_cache
from .fast_linear import DecodeLinear
from .fused_linear import as_linear, fuse_linears
from .norms import FusedLayerNorm, FusedRMSNorm

__all__ = ["InjectedAttention", "sdpa", "attention", "alibi_slopes", "alibi_bias", "GQA_SUPPORTED", "NO_ROTARY"]


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):  # pragma: no cover - odd version strings
        return False


#: SDPA takes ``enable_gqa`` from torch 2.5 on.
GQA_SUPPORTED = _torch_at_least(2, 5)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool = True,
         scale: Optional[float] = None) -> torch.Tensor:
    """Attention of q ``[B, Hq, Tq, D]`` over k, v ``[B, Hkv, Tk, D]``; returns ``[B, Hq, Tq, D]``.

    ``mask`` is a 4-D boolean (True = attend) or additive float mask, or None; with None and ``causal``,
    SDPA's own causal masking runs (as Hugging Face's SDPA path does, keys beyond the query length of an
    empty static cache are dropped first).

    Example:
        >>> import torch
        >>> q = torch.randn(2, 4, 1, 8); k = torch.randn(2, 1, 5, 8); v = torch.randn(2, 1, 5, 8)
        >>> mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        >>> sdpa(q, k, v, mask).shape
        torch.Size([2, 4, 1, 8])
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"attention mask must be 4-D [batch, heads|1, q, kv], got shape {tuple(mask.shape)}")
        if mask.shape[-1] > tk:
            mask = mask[..., :tk]
    is_causal = bool(causal and mask is None and tq > 1)
    if is_causal and tk > tq:
        k, v, tk = k[:, :, :tq], v[:, :, :tq], tq
    if hq != hkv:
        if hq % hkv:
            raise ValueError(f"{hq} query heads do not group over {hkv} kv heads")
        n_rep = hq // hkv
        if tq == 1 and mask is not None:
            # one query token: put each KV group's query heads on the query axis; K/V are used as they are
            qp = q.reshape(b, hkv, n_rep, d)
            m = mask.reshape(mask.shape[0], hkv, n_rep, tk) if mask.shape[1] == hq else mask
            out = F.scaled_dot_product_attention(qp, k, v, attn_mask=m, scale=scale)
            return out.reshape(b, hq, 1, d)
        if GQA_SUPPORTED:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=True)
        k = k[:, :, None].expand(b, hkv, n_rep, tk, d).reshape(b, hq, tk, d)
        v = v[:, :, None].expand(b, hkv, n_rep, tk, d).reshape(b, hq, tk, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """The ALiBi slope of each head (float32 ``[H]``): ``2 ** (-max_bias * i / n)`` for ``i = 1..n`` with
    ``n`` the next power of two, odd-indexed then even-indexed ones for a head count that is not a power of
    two -- BLOOM's and MPT's slopes (the same numbers for ``max_bias=8``).

    Example:
        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
        >>> alibi_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
        True
    """
    n = 1 << max(int(num_heads) - 1, 0).bit_length()
    base = torch.arange(1, n + 1, dtype=torch.float32) * (float(max_bias) / n)
    slopes = 1.0 / torch.pow(2.0, base)
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive ALiBi bias ``[1, H, Tq, Tk]``: ``slope_h * (k_pos - q_pos)`` (positions as 1-D tensors).

    Softmax is shift-invariant per query row, so this equals BLOOM's ``slope * key_position`` and MPT's
    ``slope * (key - last key)`` wherever the keys a query sees are contiguous (no or left padding).

    Example:
        >>> alibi_bias(torch.tensor([0.5]), torch.tensor([2]), torch.arange(3), torch.float32).tolist()
        [[[[-1.0, -0.5, 0.0]]]]
    """
    rel = (k_pos[None, :] - q_pos[:, None]).to(torch.float32)
    return (slopes.to(rel.device)[:, None, None] * rel[None]).to(dtype)[None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool = True,
              scale: Optional[float] = None, softcap: Optional[float] = None,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`sdpa` plus two score modifiers: an additive ``bias`` ``[1|B, H, Tq, Tk]`` (ALiBi) and tanh
    soft-capping ``softcap * tanh(scores / softcap)`` applied before the mask (Gemma-2). Without either it
    is :func:`sdpa`; with a bias only, SDPA with the bias folded into the mask; with soft-capping, the
    scores are computed explicitly (SDPA cannot cap), softmax in float32.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
        >>> torch.allclose(attention(q, k, v, None, softcap=1e9), sdpa(q, k, v, None), atol=1e-6)
        True
    """
    if softcap is None and bias is None:
        return sdpa(q, k, v, mask, causal=causal, scale=scale)
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    if mask is not None and mask.shape[-1] > tk:
        mask = mask[..., :tk]
    if mask is None and causal and tq > 1:
        if tk > tq:  # an empty static cache (see sdpa)
            k, v, tk = k[:, :, :tq], v[:, :, :tq], tq
            bias = bias[..., :tq] if bias is not None else None
        idx = torch.arange(tq, device=q.device)
        mask = (idx[None, :] <= idx[:, None])[None, None]
    add = _additive(mask, q.dtype) if mask is not None else None
    if softcap is None:
        add = bias.to(q.dtype) if add is None else add + bias.to(q.dtype)
        return sdpa(q, k, v, add, causal=False, scale=scale)
    hkv = k.shape[1]
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if add is not None:
        scores = scores + add
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(weights, v)


def _get(module: torch.nn.Module, path: Optional[str]) -> Optional[torch.nn.Module]:
    if path is None:
        return None
    return module.get_submodule(path) if path else module


class InjectedAttention(torch.nn.Module):
    """Fused-QKV attention for one layer; see the module docstring.

    Head counts live on the instance (``num_heads``, ``num_kv_heads``, ``head_dim``): under tensor
    parallelism they are the rank's local counts.

    Example:
        >>> import torch
        >>> from policyinject.policy import AttentionSpec
        >>> class Attn(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))
        >>> spec = AttentionSpec(q="q", k="k", v="v", o="o")
        >>> attn = InjectedAttention.build(Attn(), spec, num_heads=2, num_kv_heads=2, head_dim=4, backend="torch")
        >>> q, k, v = attn.project(torch.randn(1, 3, 8), None, None)
        >>> attn.output(sdpa(q, k, v, None)).shape
        torch.Size([1, 3, 8])
    """

    def __init__(self, qkv: torch.nn.Module, o: torch.nn.Module, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, layout: QKVLayout = QKVLayout.BLOCKS, rotary: Optional[str] = None,
                 q_norm: Optional[torch.nn.Module] = None, k_norm: Optional[torch.nn.Module] = None,
                 causal: bool = True, scaling: Optional[float] = None, layer_idx: Optional[int] = None,
                 backend: str = "auto", signature: Optional[CallSignature] = None, softcap: Optional[float] = None,
                 alibi: Optional[torch.Tensor] = None, clip_qkv: Optional[float] = None,
                 qk_norm_scope: str = "head", qk_norm_layout: str = "bhtd", inverted_bool_mask: bool = False,
                 rotary_tables: Optional[str] = None) -> None:
        super().__init__()
        self.qkv = qkv
        self.o = o
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.num_heads = int(num_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.layout = QKVLayout(layout)
        self.rotary = rotary
        self.causal = bool(causal)
        self.scaling = scaling
        self.layer_idx = layer_idx
        self.backend = backend
        self.signature = signature or CallSignature(("hidden_states", "position_embeddings", "attention_mask", "cache"), 2)
        #: Attention-score soft-cap (None: off), ALiBi slopes ``[H]`` (None: no ALiBi), q/k/v clamp.
        self.softcap = float(softcap) if softcap else None
        self.alibi = alibi
        self.clip_qkv = float(clip_qkv) if clip_qkv else None
        self.qk_norm_scope = QKNormScope(qk_norm_scope)
        self.qk_norm_layout = qk_norm_layout
        self.inverted_bool_mask = bool(inverted_bool_mask)
        #: "half": the tables given are rotate-half ones; re-laid out for the interleaved rotation per call.
        self.rotary_tables = rotary_tables

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, attn_module: torch.nn.Module, spec: Any, *, num_heads: int, num_kv_heads: int, head_dim: int,
              backend: str = "auto", layer_idx: Optional[int] = None, norm_offset: float = 0.0,
              model_config: Any = None) -> "InjectedAttention":
        """Build from the original attention module (``spec.module`` already resolved to ``attn_module``).

        Paths of ``spec`` (q, k, v, qkv, o, q_norm, k_norm) are relative to ``attn_module``; the projections'
        parameters are concatenated once (q/k/v) or shared (fused qkv, o). ``norm_offset`` is the RMSNorm
        weight offset of per-head q/k norms (1.0 for Gemma-style norms). ``model_config`` (default: the
        module's own ``config``) is what the spec's value sources (scale, soft-cap, ALiBi, clip) read.
        """
        cfg = model_config if model_config is not None else getattr(attn_module, "config", None)
        if spec.qkv is not None:
            qkv = as_linear(_get(attn_module, spec.qkv))
            layout = spec.qkv_layout
        else:
            qkv = fuse_linears([_get(attn_module, spec.q), _get(attn_module, spec.k), _get(attn_module, spec.v)])
            layout = QKVLayout.BLOCKS
        o = as_linear(_get(attn_module, spec.o))
        proj = spec.qkv if spec.qkv is not None else spec.q
        owners = [attn_module]
        if "." in proj:
            owners.append(attn_module.get_submodule(proj.rsplit(".", 1)[0]))

        def attr(name: str, default: Any) -> Any:
            for owner in owners:
                if hasattr(owner, name):
                    return getattr(owner, name)
            return default

        q_norm = _per_head_norm(_get(attn_module, spec.q_norm), norm_offset, backend)
        k_norm = _per_head_norm(_get(attn_module, spec.k_norm), norm_offset, backend)
        scaling = read_value(cfg, spec.scale)
        if scaling is None:
            scaling = attr("scaling", None)
        causal = bool(attr("is_causal", spec.causal))
        if layer_idx is None:
            layer_idx = attr("layer_idx", None)
        rotary = spec.rotary
        if spec.rotary_switch is not None and not getattr(attn_module, spec.rotary_switch, True):
            rotary = None
        slopes = None
        try:
            total = read_size(cfg, spec.num_heads) if cfg is not None else None
        except (TypeError, ValueError, AttributeError):
            total = None
        sharded = total is not None and total != num_heads
        if sharded and QKNormScope(spec.qk_norm_scope) is QKNormScope.FULL and spec.q_norm is not None:
            raise PolicyError(f"{type(attn_module).__name__}: full-width q/k norms (qk_norm_scope='full') "
                              f"normalise over all {total} heads; {num_heads} local heads (tensor parallelism) "
                              "are not supported")
        if spec.alibi:
            if sharded:
                raise PolicyError(f"{type(attn_module).__name__}: ALiBi slopes follow the global head index; "
                                  f"{num_heads} local heads of {total} (tensor parallelism) are not supported")
            slopes = alibi_slopes(num_heads, read_value(cfg, spec.alibi_max_bias) or 8.0)
        return cls(qkv, o, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, layout=layout,
                   rotary=rotary, q_norm=q_norm, k_norm=k_norm, causal=causal,
                   scaling=float(scaling) if isinstance(scaling, (int, float)) else None,
                   layer_idx=layer_idx, backend=backend, signature=CallSignature.of(type(attn_module)),
                   softcap=read_value(cfg, spec.logit_softcap), alibi=slopes, clip_qkv=read_value(cfg, spec.clip_qkv),
                   qk_norm_scope=spec.qk_norm_scope, qk_norm_layout=spec.qk_norm_layout,
                   inverted_bool_mask=spec.inverted_bool_mask, rotary_tables=spec.rotary_tables)

    # ------------------------------------------------------------------------------------------- compute
    def split(self, fused: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split the fused projection ``[B, T, (Hq + 2 Hkv) D]`` into q, k, v ``[B, H, T, D]`` (views)."""
        b, t, _ = fused.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.layout is QKVLayout.BLOCKS:
            q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.view(b, t, hq, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        elif self.layout is QKVLayout.PER_HEAD:
            x = fused.view(b, t, hq, 3, d)
            q, k, v = x[..., 0, :], x[..., 1, :], x[..., 2, :]
        else:
            g = hq // hkv
            x = fused.view(b, t, hkv, g + 2, d)
            q = x[:, :, :, :g].reshape(b, t, hq, d)
            k, v = x[:, :, :, g], x[:, :, :, g + 1]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def project(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, H, T, D]`` for hidden states ``x [B, T, hidden]``: one matmul, q/k norms, rotary.

        ``cos``/``sin`` are the model's rotary tables (``[B, T, R]``, R <= D rotated dims). A policy with
        rotary needs them, except under ALiBi, where the callers pass :data:`NO_ROTARY` as ``cos``.
        """
        if cos is NO_ROTARY:
            cos = sin = None
        elif self.rotary is not None and cos is None:
            raise PolicyError(
                "this attention applies rotary embeddings but got no position_embeddings=(cos, sin); the model "
                "must compute them once per forward (transformers >= 4.48 style)")
        return self.split_qkv(self.qkv(x), cos, sin)

    def split_qkv(self, fused: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rest of :meth:`project` after the qkv matmul: clipping, the split, q/k norms and rotary."""
        if cos is NO_ROTARY:
            cos = sin = None
        if self.clip_qkv is not None:
            fused = fused.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = self.split(fused)
        if self.q_norm is not None:
            q = self._qk_norm(self.q_norm, q)
        if self.k_norm is not None:
            k = self._qk_norm(self.k_norm, k)
        if self.rotary is not None and cos is not None:
            if self.rotary_tables == "half" and self.rotary == "interleaved":
                half = cos.shape[-1] // 2
                cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
            q, k = _ops.rotary(q, k, cos, sin, self.rotary, self.backend)
        return q, k, v

    def _qk_norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A q/k norm on ``x [B, H, T, D]``: over the full width (``full``), per head on a fused norm
        (layout-free), or per head on a kept module called in its own layout (``qk_norm_layout``)."""
        b, h, t, d = x.shape
        if self.qk_norm_scope is QKNormScope.FULL:
            return norm(x.transpose(1, 2).reshape(b, t, h * d)).view(b, t, h, d).transpose(1, 2)
        if self.qk_norm_layout == "bthd" and not isinstance(norm, (FusedRMSNorm, FusedLayerNorm)):
            return norm(x.transpose(1, 2)).transpose(1, 2)
        return norm(x)

    def scores_extras(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> dict:
        """Keyword arguments of :func:`attention` beyond the mask: ``softcap`` and the ALiBi ``bias`` for
        queries at ``q_pos`` over keys at ``k_pos`` (cache slots)."""
        out: dict = {}
        if self.softcap is not None:
            out["softcap"] = self.softcap
        if self.alibi is not None:
            out["bias"] = alibi_bias(self.alibi, q_pos, k_pos, dtype)
        return out

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """Output projection of the attention result ``[B, Hq, T, D]``."""
        b, h, t, d = attn.shape
        return self.o(attn.transpose(1, 2).reshape(b, t, h * d))

    def attend_fn(self, mask: Optional[torch.Tensor], cache: Any = None, cache_kwargs: Optional[dict] = None
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The Hugging Face ``attend``: update the HF cache object (as HF attention does), then :func:`sdpa`."""
        if cache is not None and hasattr(cache, "self_attention_cache"):
            cache = cache.self_attention_cache

        if mask is not None and self.inverted_bool_mask and mask.dtype == torch.bool:
            mask = ~mask

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if cache is not None:
                if self.layer_idx is None:
                    raise PolicyError("the replaced attention has no layer_idx; it cannot use a KV cache")
                k, v = cache.update(k, v, self.layer_idx, cache_kwargs or {})
            if self.softcap is None and self.alibi is None:
                return sdpa(q, k, v, mask, causal=self.causal, scale=self.scaling)
            tq, tk = q.shape[2], k.shape[2]
            q_pos = (cache_kwargs or {}).get("cache_position")
            if q_pos is None or q_pos.numel() != tq:
                q_pos = torch.arange(tk - tq, tk, device=q.device)
            extras = self.scores_extras(q_pos.to(q.device), torch.arange(tk, device=q.device), q.dtype)
            return attention(q, k, v, mask, causal=self.causal, scale=self.scaling, **extras)

        return attend

    def run(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``output(attend(*project(x, cos, sin)))``."""
        return self.output(attend(*self.project(x, cos, sin)))

    def run_normed(self, hidden: torch.Tensor, pending: Optional[torch.Tensor], norm: torch.nn.Module,
                   cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                   attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(run(norm(s)), s)`` with ``s = hidden + pending``, where the qkv projection can fold the residual
        add and the norm into its decode GEMV (:meth:`DecodeLinear.normed`: one row on a GPU); else None."""
        if not isinstance(self.qkv, DecodeLinear):
            return None
        if cos is not NO_ROTARY and self.rotary is not None and cos is None:
            return None  # project() raises the clear error
        done = self.qkv.normed(hidden, pending, norm)
        if done is None:
            return None
        fused, s = done
        return self.output(attend(*self.split_qkv(fused, cos, sin))), s

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face attention call: same arguments as the replaced module; returns ``(output, None)``."""
        bound = self.signature.bind(args, kwargs)
        x = self.signature.hidden(bound)
        cos, sin = _rotary_tables(bound)
        cache = find_cache(bound)
        attend = self.attend_fn(bound.get("attention_mask"), cache, _cache_kwargs(bound, cos, sin))
        out = self.run(x, cos, sin, attend)
        return self.signature.wrap(out) if self.signature.tuple_len else out

    def extra_repr(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("softcap", "clip_qkv") if getattr(self, n) is not None)
        if self.alibi is not None:
            extra += ", alibi=True"
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layout={self.layout.value}, rotary={self.rotary}, causal={self.causal}, backend={self.backend}"
                f"{extra}")


def _per_head_norm(module: Optional[torch.nn.Module], offset: float, backend: str) -> Optional[torch.nn.Module]:
    """A per-head q/k norm on the fused kernel: LayerNorm, or RMSNorm scaled by ``offset + weight`` (the
    layer's own norm convention); any other module is kept as it is."""
    if module is None:
        return None
    if isinstance(module, torch.nn.LayerNorm):
        return _ops.make_norm(module, "layer", backend=backend)
    if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
        return _ops.make_norm(module, "rms", offset, backend=backend)
    return module


#: Passed as ``cos`` to :meth:`InjectedAttention.project` when ALiBi replaces rotary (Falcon ``alibi=True``).
NO_ROTARY: Any = object()


def _rotary_tables(bound: dict) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(cos, sin)`` from ``position_embeddings``; :data:`NO_ROTARY` when ALiBi (in the mask) replaces rotary."""
    if bound.get("alibi") is not None:
        return NO_ROTARY, None
    pe = bound.get("position_embeddings")
    if pe is None:
        return None, None
    return pe[0], pe[1]


def _cache_kwargs(bound: dict, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> dict:
    if cos is NO_ROTARY:
        cos = sin = None
    out: dict = {"sin": sin, "cos": cos}
    if bound.get("cache_position") is not None:
        out["cache_position"] = bound["cache_position"]
    return out
