"""The decode engine's prefill as a fixed-shape step: prompts right-padded to a length bucket, one CUDA graph per
``(batch, bucket, mask kind)``, captured lazily, least recently used evicted.

An eager prefill walks every layer from Python: for a 128-token prompt of an 8B model the host takes several
times longer than the GPU. A graph replay removes the host, but a graph has fixed shapes, so the prompt is
padded on the right to a *bucket* (:func:`bucket_for`: the next power of two up to 512 tokens, then the next
multiple of 256), with

- the padding columns masked as keys (they come after every real token, so causal attention never sees them
  from a real query; each pad query sees itself, so no softmax row is empty);
- their positions the last real position (in range of the rotary tables; their outputs are never used);
- the logits taken at column ``T - 1`` (a device scalar, :meth:`DecodeRunner.forward`'s ``last_index``);
- the pads' K/V written to cache slots ``[T, bucket)``: the decode loop never reads a slot before writing it
  (its mask marks slots ``< T`` and each slot it writes), so they are overwritten in turn.

A prompt without padding (every mask entry 1) on layers without a sliding window runs plain causal attention
(no mask tensor: SDPA's flash kernel); otherwise the additive mask of
:func:`~policyinject.decode.kv_cache.prefill_mask`.

The same function runs eagerly (``use_graphs=False``, or the first call after the KV cache is allocated) and
is what a graph captures, so a graphed prefill gives the eager prefill's logits bit for bit (the same kernels
on the same shapes); on a GPU the decode engine pads in both modes. The logits are copied out of the graph's
buffers: the returned tensor never aliases them.

Example:
    >>> [bucket_for(n, 4096) for n in (1, 16, 17, 128, 129, 512, 513, 2048)]
    [16, 16, 32, 128, 256, 512, 768, 2048]
    >>> bucket_for(100, 112)  # never more slots than the cache has
    112
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import attrs
import torch

from .graphs import GraphCache
from .kv_cache import StaticKVCache, prefill_mask
from .runner import DecodeRunner

__all__ = ["bucket_for", "BucketedPrefill", "PrefillBuffers"]

#: Up to this many tokens buckets are powers of two; above, multiples of :data:`BUCKET_STEP`.
POW2_BUCKETS_UP_TO = 512
BUCKET_STEP = 256


def bucket_for(length: int, max_len: int, minimum: int = 16) -> int:
    """The padded prompt length of a ``length``-token prompt: the next power of two (at least ``minimum``) up
    to :data:`POW2_BUCKETS_UP_TO`, then the next multiple of :data:`BUCKET_STEP`; at most ``max_len``.

    Example:
        >>> bucket_for(300, 4096), bucket_for(1000, 4096), bucket_for(3, 4096, minimum=4)
        (512, 1024, 4)
    """
    if length < 1:
        raise ValueError(f"a prompt has at least one token, got length={length}")
    if length <= POW2_BUCKETS_UP_TO:
        bucket = max(int(minimum), 1)
        while bucket < length:
            bucket *= 2
    else:
        bucket = -(-length // BUCKET_STEP) * BUCKET_STEP
    return min(bucket, int(max_len))


@attrs.define(eq=False)
class PrefillBuffers:
    """The fixed device buffers one bucket's prefill reads and writes (a graph captures exactly these)."""

    ids: torch.Tensor  #: [B, bucket] long, the prompt then pad ids (0)
    mask: torch.Tensor  #: [B, bucket] long, the attention mask then zeros
    last: torch.Tensor  #: [1] long, the column of the last prompt token (T - 1)
    #: [B, V] float32, the logits of the last prompt token (allocated by the first, uncaptured run)
    logits: Optional[torch.Tensor] = None

    @classmethod
    def allocate(cls, batch: int, bucket: int, device: torch.device) -> "PrefillBuffers":
        """Zeroed buffers for ``batch`` rows of ``bucket`` tokens.

        Example:
            >>> PrefillBuffers.allocate(2, 16, torch.device("cpu")).ids.shape
            torch.Size([2, 16])
        """
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)  # noqa: E731
        return cls(zeros(batch, bucket), zeros(batch, bucket), zeros(1))

    def write_logits(self, logits: torch.Tensor) -> None:
        """Keep ``logits [B, V]`` as float32 (into the existing buffer: a captured graph writes the same one)."""
        if self.logits is None or self.logits.shape != logits.shape:
            self.logits = logits.float()
        else:
            self.logits.copy_(logits)

    def stage(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Copy a left-padded ``[B, T]`` prompt and its mask in, pad the rest (no host synchronisation)."""
        t = ids.shape[1]
        self.ids[:, :t].copy_(ids)
        self.mask[:, :t].copy_(mask)
        if t < self.ids.shape[1]:
            self.ids[:, t:].zero_()
            self.mask[:, t:].zero_()
        self.last.fill_(t - 1)


class BucketedPrefill:
    """Right-padded, bucketed prefill over a :class:`DecodeRunner` and its :class:`StaticKVCache`, replayed
    from CUDA graphs when ``use_graphs``; see the module docstring.

    ``capacity`` bounds the graphs (and their buffers) held at once; ``minimum`` is the smallest bucket.
    ``stats`` counts graph captures and replays, eager runs, and captures that failed (a step that
    synchronises with the host cannot be captured: that signature then runs eagerly, with a warning).

    Example (on the CPU: eager, padded to the 16-token bucket):
        >>> import torch
        >>> from policyinject.pipeline import init_inference
        >>> from policyinject.decode.generate import Decoder
        >>> from policyinject.testing.presets import tiny_model
        >>> decoder = Decoder.from_engine(init_inference(tiny_model("llama"), replace_with_kernel_inject=True,
        ...                                              dtype="fp32"))
        >>> ids = torch.tensor([[5, 6, 7]]); mask = torch.ones_like(ids)
        >>> decoder.cache.reserve(1); decoder.runner.prepare(decoder.max_len)
        >>> p = BucketedPrefill(decoder.runner, decoder.cache, use_graphs=False)
        >>> with torch.inference_mode():
        ...     logits = p.run(ids, mask)
        >>> logits.shape[0], p.causal_only(mask), p.stats["eager"]
        (1, True, 1)
    """

    def __init__(self, runner: DecodeRunner, cache: StaticKVCache, use_graphs: bool, capacity: int = 4,
                 minimum: int = 16) -> None:
        self.runner = runner
        self.cache = cache
        self.use_graphs = bool(use_graphs)
        self.minimum = int(minimum)
        self.graphs = GraphCache(capacity)
        self._buffers: "OrderedDict[Hashable, Tuple[PrefillBuffers, Callable[[], None]]]" = OrderedDict()
        self._ungraphable: set = set()
        self._generation = cache.generation
        self.stats: Dict[str, int] = {"eager": 0, "capture_failures": 0}

    def causal_only(self, mask: torch.Tensor) -> bool:
        """True when the prompt has no padding and no layer has a sliding window: plain causal attention
        suffices (one read of the mask; a host synchronisation when it is on the GPU)."""
        return all(w is None for w in self.runner.windows) and bool(mask.bool().all())

    def _entry(self, batch: int, bucket: int, causal: bool) -> Tuple[Hashable, PrefillBuffers,
                                                                                  Callable[[], None]]:
        if self.cache.generation != self._generation:  # buffers re-allocated: every graph is stale
            self.graphs.drop()
            self._buffers.clear()
            self._generation = self.cache.generation
        key = (batch, bucket, causal, self.cache.generation)
        entry = self._buffers.get(key)
        if entry is None:
            buf = PrefillBuffers.allocate(batch, bucket, self.runner.device)
            entry = (buf, self._step_fn(buf, causal))
            self._buffers[key] = entry
            while len(self._buffers) > self.graphs.capacity:
                old, _ = self._buffers.popitem(last=False)
                self.graphs.drop(lambda k, old=old: k == old)
        else:
            self._buffers.move_to_end(key)
        return key, entry[0], entry[1]

    def _step_fn(self, buf: PrefillBuffers, causal: bool) -> Callable[[], None]:
        runner, cache = self.runner, self.cache
        dtype = runner.dtype

        def step() -> None:
            masks: Dict[Optional[int], Optional[torch.Tensor]] = (
                {None: None} if causal else {w: prefill_mask(buf.mask, dtype, w) for w in set(runner.windows)})
            attends = [cache.prefill_attend(i, masks[w], s, **runner.attend_extras[i])
                       for i, (w, s) in enumerate(zip(runner.windows, runner.scales))]
            pos = (buf.mask.cumsum(-1) - 1).clamp_min(0)
            logits = runner.forward(buf.ids, pos, attends, last_only=True, last_index=buf.last)
            buf.write_logits(logits[:, -1])

        return step

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prefill a left-padded ``[B, T]`` prompt (cache slots ``[0, bucket)`` written); returns the float32
        logits ``[B, V]`` of its last column, a new tensor. The cache must have room for ``B`` rows
        (:meth:`StaticKVCache.reserve`) and the runner its rotary tables (:meth:`DecodeRunner.prepare`)."""
        b, t = input_ids.shape
        bucket = bucket_for(t, self.cache.max_len, self.minimum)
        causal = self.causal_only(attention_mask)
        ready = self.cache.allocated  # the first prefill allocates the cache: eagerly, never inside a capture
        key, buf, fn = self._entry(b, bucket, causal)
        buf.stage(input_ids, attention_mask)
        if not (self.use_graphs and ready) or key in self._ungraphable:
            fn()
            self.stats["eager"] += 1
            return buf.logits.clone()
        try:
            self.graphs.run(key, fn, lambda: (lambda: None))  # warm-up rewrites the same slots: nothing to restore
        except RuntimeError as exc:
            self._ungraphable.add(key)
            self.stats["capture_failures"] += 1
            warnings.warn(f"the prefill of a [{b}, {bucket}] prompt could not be captured in a CUDA graph "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it runs "
                          "eagerly", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            fn()
            self.stats["eager"] += 1
        return buf.logits.clone()

    def stats_dict(self) -> Dict[str, Any]:
        """Graph captures, replays, evictions and graphs held, eager runs and failed captures, prefixed
        ``prefill_``.

        Example:
            >>> from policyinject.decode.kv_cache import StaticKVCache
            >>> p = BucketedPrefill.__new__(BucketedPrefill)
            >>> p.graphs, p.stats = GraphCache(2), {"eager": 0, "capture_failures": 0}
            >>> sorted(p.stats_dict())[:2]
            ['prefill_capture_failures', 'prefill_captures']
        """
        out = {f"prefill_{k}": v for k, v in {**self.graphs.stats, **self.stats}.items()}
        out["prefill_graphs"] = len(self.graphs)
        return out
