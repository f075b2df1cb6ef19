"""Static, preallocated KV cache owned by the decode engine, and the ``attend`` closures that use it.

One pair of buffers per layer, ``k`` and ``v`` of shape ``[batch_capacity, kv_heads, max_len, head_dim]`` in
the model's dtype on the model's device. ``max_len`` comes from the config's ``max_out_tokens`` (prompt plus
new tokens, as in DeepSpeed); ``batch_capacity`` from ``max_batch_size`` or, when that is None, from the first
call (a later, larger batch re-allocates the buffers and bumps :attr:`StaticKVCache.generation`, which
invalidates captured graphs). A layer's buffers are allocated at the first prefill that reaches it, from the
shapes of the k/v it produces, so head counts after tensor parallelism or a custom block need no
configuration. Buffers start zeroed: masked slots are multiplied by an attention weight of exactly 0, and
0 x NaN from uninitialised memory would poison the output.

Layout in time: a batch is left-padded to a common prompt length ``T``; slot ``s`` of every row holds the
token at column ``s`` (pads included, masked out), so all rows write the same slot at each step and one
scalar ``cache_pos`` addresses the step. Rotary positions are per row (the number of real tokens before).

Two kinds of ``attend`` (the :class:`~policyinject.modules.block.InjectedBlock` contract: q/k/v after
rotary as ``[B, H, T, D]``, returns ``[B, Hq, T, D]``):

- :meth:`StaticKVCache.prefill_attend`: writes slots ``[0, T)`` and attends over the fresh k/v with a
  causal + padding mask;
- :meth:`StaticKVCache.decode_attend`: writes slot ``cache_pos`` (a device tensor, so a CUDA graph can
  replay it at every step) and attends over a fixed-size view of the first ``span`` slots with a mask, so
  every shape is static.

Example:
    >>> import torch
    >>> cache = StaticKVCache(num_layers=1, max_len=8)
    >>> cache.reserve(2)
    >>> q = torch.randn(2, 4, 3, 16); k = torch.randn(2, 2, 3, 16); v = torch.randn(2, 2, 3, 16)
    >>> mask = torch.ones(2, 3, dtype=torch.bool)
    >>> out = cache.prefill_attend(0, prefill_mask(mask, q.dtype))(q, k, v)
    >>> out.shape, cache.k[0].shape
    (torch.Size([2, 4, 3, 16]), torch.Size([2, 2, 8, 16]))
    >>> torch.equal(cache.k[0][:, :, :3], k)
    True
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..modules.attention import alibi_bias, attention, sdpa

__all__ = ["StaticKVCache", "prefill_mask", "decode_mask", "span_for"]

Attend = Callable[..., torch.Tensor]


def span_for(length: int, max_len: int, minimum: int = 256) -> int:
    """The number of cache slots a decode step attends over: the next power of two >= ``length``
    (at least ``minimum``), capped at ``max_len``.

    A decode graph is captured per span, so a short generation does not read a long cache; there are at
    most ``log2(max_len / minimum) + 1`` spans.

    Example:
        >>> [span_for(n, 1024) for n in (1, 256, 257, 1000)]
        [256, 256, 512, 1024]
        >>> span_for(300, 300)
        300
    """
    span = max(int(minimum), 1)
    while span < length:
        span *= 2
    return min(span, int(max_len))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative value elsewhere (never -inf: no NaN from empty rows)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def prefill_mask(attention_mask: torch.Tensor, dtype: torch.dtype, window: Optional[int] = None) -> torch.Tensor:
    """Additive mask ``[B, 1, T, T]`` for a left-padded prompt: causal, pads masked as keys, each query may
    always see itself (so a pad query's row is never empty), and an optional sliding window
    (key allowed when ``query - key < window``, Hugging Face's convention).

    Example:
        >>> m = prefill_mask(torch.tensor([[0, 1, 1]]), torch.float32)
        >>> (m[0, 0] == 0).int().tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    """
    b, t = attention_mask.shape
    device = attention_mask.device
    idx = torch.arange(t, device=device)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal = causal & ((idx[:, None] - idx[None, :]) < int(window))
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)[None]
    return _additive(allowed, dtype)[:, None]


def decode_mask(kv_mask: torch.Tensor, cache_pos: torch.Tensor, span: int, dtype: torch.dtype,
                window: Optional[int] = None, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive mask ``[B, 1, 1, span]`` of one decode step over the first ``span`` slots.

    ``kv_mask [B, max_len]`` marks the written, non-pad slots (the current slot included); ``cache_pos``
    is a one-element tensor; with a ``window``, slots at or before ``cache_pos - window`` are masked too.

    Example:
        >>> kv = torch.tensor([[False, True, True, True]])
        >>> (decode_mask(kv, torch.tensor([3]), 4, torch.float32, window=2)[0, 0, 0] == 0).tolist()
        [False, False, True, True]
    """
    allowed = kv_mask[:, :span]
    if window is not None:
        if slots is None:
            slots = torch.arange(span, device=kv_mask.device)
        allowed = allowed & (slots[None, :span] > (cache_pos - int(window)))
    return _additive(allowed, dtype)[:, None, None, :]


class StaticKVCache:
    """Per-layer static K/V buffers; see the module docstring.

    ``num_layers`` layers, ``max_len`` slots. Nothing is allocated before :meth:`reserve` and the first
    prefill.
    """

    def __init__(self, num_layers: int, max_len: int, batch_capacity: Optional[int] = None) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.num_layers = int(num_layers)
        self.max_len = int(max_len)
        self.batch_capacity = int(batch_capacity) if batch_capacity else 0
        self.k: List[Optional[torch.Tensor]] = [None] * self.num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * self.num_layers
        #: Bumped whenever buffers are (re-)allocated; graphs captured on older buffers are stale.
        self.generation = 0

    # --------------------------------------------------------------------------------------- storage
    def reserve(self, batch: int) -> None:
        """Make room for ``batch`` rows; a larger batch than the capacity drops every buffer (they are
        re-allocated at the next prefill) and bumps :attr:`generation`."""
        if batch <= self.batch_capacity:
            return
        self.batch_capacity = int(batch)
        self.k = [None] * self.num_layers
        self.v = [None] * self.num_layers
        self.generation += 1

    def _ensure(self, layer: int, k: torch.Tensor) -> None:
        _, hkv, _, d = k.shape
        buf = self.k[layer]
        want = (self.batch_capacity, hkv, self.max_len, d)
        if buf is not None and tuple(buf.shape) == want and buf.dtype == k.dtype and buf.device == k.device:
            return
        self.k[layer] = torch.zeros(want, dtype=k.dtype, device=k.device)
        self.v[layer] = torch.zeros(want, dtype=k.dtype, device=k.device)
        self.generation += 1

    @property
    def allocated(self) -> bool:
        return all(t is not None for t in self.k)

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers.

        Example:
            >>> StaticKVCache(2, 16).nbytes()
            0
        """
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    # ---------------------------------------------------------------------------------------- attends
    def prefill_attend(self, layer: int, mask: Optional[torch.Tensor], scale: Optional[float] = None,
                       softcap: Optional[float] = None, alibi: Optional[torch.Tensor] = None) -> Attend:
        """The ``attend`` of layer ``layer`` for a prompt of ``T`` tokens: writes slots ``[0, T)`` and attends
        over the fresh k/v under ``mask`` (from :func:`prefill_mask`; None: plain causal attention, for a
        prompt without padding, which lets SDPA take its flash kernel), with attention-score soft-capping
        ``softcap`` and ALiBi ``alibi`` slopes ``[H]`` when given."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            b, _, t, _ = k.shape
            if t > self.max_len:
                raise ValueError(f"a prompt of {t} tokens does not fit a KV cache of {self.max_len} slots")
            self._ensure(layer, k)
            self.k[layer][:b, :, :t].copy_(k)
            self.v[layer][:b, :, :t].copy_(v)
            m = mask.to(q.dtype) if (mask is not None and mask.dtype != q.dtype) else mask
            if softcap is None and alibi is None:
                return sdpa(q, k, v, m, causal=m is None, scale=scale)
            idx = torch.arange(t, device=q.device)
            bias = alibi_bias(alibi, idx, idx, q.dtype) if alibi is not None else None
            return attention(q, k, v, m, causal=m is None, scale=scale, softcap=softcap, bias=bias)

        return attend

    def decode_attend(self, layer: int, batch: int, span: int, cache_pos: torch.Tensor, kv_mask: torch.Tensor,
                      mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                      window: Optional[int] = None, backend: str = "auto", rotary: Optional[str] = None,
                      cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None,
                      softcap: Optional[float] = None, alibi: Optional[torch.Tensor] = None) -> Attend:
        """The ``attend`` of layer ``layer`` for one decode step: writes slot ``cache_pos`` of rows
        ``[0, batch)`` and attends over the valid slots of ``[0, span)``
        (:func:`~policyinject.decode.attention.decode_attention`; ``mask`` from :func:`decode_mask` is shared
        between layers on the PyTorch path and unused by the Triton kernel). With ``rotary`` the q/k it
        receives are not rotated yet and it applies the rotary embedding (``cos``/``sin [B, 1, R]``) itself.

        ``softcap`` and ``alibi`` (slopes ``[H]``) select the PyTorch path (the Triton kernel has neither).
        Every tensor it touches is fixed when the closure is made, so a CUDA graph can capture it."""
        from .attention import decode_attention

        kc = self.k[layer]
        vc = self.v[layer]
        if kc is None:
            raise RuntimeError(f"layer {layer} has no KV cache yet: run a prefill first")
        rows = kv_mask[:batch]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return decode_attention(q, k, v, kc, vc, cache_pos, rows, span, scale=scale, window=window,
                                    backend=backend, mask=mask, cos=cos, sin=sin, rotary=rotary, softcap=softcap,
                                    alibi=alibi)

        return attend
