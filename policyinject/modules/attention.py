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
from ..policy.model import QKVLayout
from . import _ops
from ._hf import CallSignature, find_cache
from .fused_linear import as_linear, fuse_linears

__all__ = ["InjectedAttention", "sdpa", "GQA_SUPPORTED", "NO_ROTARY"]


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
                 backend: str = "auto", signature: Optional[CallSignature] = None) -> None:
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

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, attn_module: torch.nn.Module, spec: Any, *, num_heads: int, num_kv_heads: int, head_dim: int,
              backend: str = "auto", layer_idx: Optional[int] = None, norm_offset: float = 0.0
              ) -> "InjectedAttention":
        """Build from the original attention module (``spec.module`` already resolved to ``attn_module``).

        Paths of ``spec`` (q, k, v, qkv, o, q_norm, k_norm) are relative to ``attn_module``; the projections'
        parameters are concatenated once (q/k/v) or shared (fused qkv, o). ``norm_offset`` is the RMSNorm
        weight offset of per-head q/k norms (1.0 for Gemma-style norms).
        """
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
        scaling = attr("scaling", None)
        causal = bool(attr("is_causal", spec.causal))
        if layer_idx is None:
            layer_idx = attr("layer_idx", None)
        return cls(qkv, o, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, layout=layout,
                   rotary=spec.rotary, q_norm=q_norm, k_norm=k_norm, causal=causal,
                   scaling=float(scaling) if isinstance(scaling, (int, float)) else None,
                   layer_idx=layer_idx, backend=backend, signature=CallSignature.of(type(attn_module)))

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
        q, k, v = self.split(self.qkv(x))
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None and cos is not None:
            q, k = _ops.rotary(q, k, cos, sin, self.rotary, self.backend)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """Output projection of the attention result ``[B, Hq, T, D]``."""
        b, h, t, d = attn.shape
        return self.o(attn.transpose(1, 2).reshape(b, t, h * d))

    def attend_fn(self, mask: Optional[torch.Tensor], cache: Any = None, cache_kwargs: Optional[dict] = None
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The Hugging Face ``attend``: update the HF cache object (as HF attention does), then :func:`sdpa`."""
        if cache is not None and hasattr(cache, "self_attention_cache"):
            cache = cache.self_attention_cache

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if cache is not None:
                if self.layer_idx is None:
                    raise PolicyError("the replaced attention has no layer_idx; it cannot use a KV cache")
                k, v = cache.update(k, v, self.layer_idx, cache_kwargs or {})
            return sdpa(q, k, v, mask, causal=self.causal, scale=self.scaling)

        return attend

    def run(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``output(attend(*project(x, cos, sin)))``."""
        return self.output(attend(*self.project(x, cos, sin)))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face attention call: same arguments as the replaced module; returns ``(output, None)``."""
        bound = self.signature.bind(args, kwargs)
        x = bound["hidden_states"]
        cos, sin = _rotary_tables(bound)
        cache = find_cache(bound)
        attend = self.attend_fn(bound.get("attention_mask"), cache, _cache_kwargs(bound, cos, sin))
        out = self.run(x, cos, sin, attend)
        return self.signature.wrap(out) if self.signature.tuple_len else out

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layout={self.layout.value}, rotary={self.rotary}, causal={self.causal}, backend={self.backend}")


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
