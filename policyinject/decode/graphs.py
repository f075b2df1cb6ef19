"""CUDA-graph capture and replay of decode steps, one graph per signature, least recently used evicted.

A *step function* takes no arguments: it reads and writes fixed device buffers (a
:class:`~policyinject.decode.state.DecodeState` and the KV cache), so replaying its graph is the same as
calling it. The *signature* (the key) is whatever changes the shapes or the code path of the step -- the
decode engine uses ``(batch, span, greedy, suppress_eos, triton attention, cache generation)``. For a key
seen for the first time, :meth:`GraphCache.run`

1. warms the function up on a side stream (``warmup`` calls; Triton compilation, cuBLAS workspaces),
   restoring the state buffers after each call so that warm-up leaves no trace,
2. captures one call into a ``torch.cuda.CUDAGraph`` (capture does not execute anything),
3. replays it.

With tensor parallelism (``collectives=True``) the step holds NCCL all-reduces, which are captured like any
other kernel: every rank captures and replays the same keys in the same order (the same calls on every rank,
as tensor parallelism needs anyway). Before such a capture the device is synchronised, so no eager collective
is still in flight, and the capture is ``thread_local``: the process group's watchdog thread keeps polling
its own events while this thread captures (the default global mode would invalidate the capture). The NCCL
communicator already exists then (the eager prefill and the warm-up calls ran the same collectives).

Every graph of one cache shares one memory pool: the steps never run concurrently, and each graph's outputs
live in the state buffers, not in the pool. When more than ``capacity`` graphs exist, the least recently used
one is dropped. Outputs: a step writes into the state buffers it was built on; the graph cache returns
nothing, so no caller ever holds an alias of a graph's internal memory.

Everything here needs CUDA; :func:`require_cuda` raises :class:`~policyinject.errors.UnsupportedError` with
a clear message before any ``torch.cuda`` call on a CPU-only build.

Example:
    >>> cache = GraphCache(capacity=2)      # constructing needs no GPU
    >>> len(cache), cache.stats["captures"]
    (0, 0)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import torch

from ..errors import UnsupportedError

__all__ = ["GraphCache", "require_cuda", "cuda_graphs_available"]


def cuda_graphs_available() -> bool:
    """True when this torch has CUDA and a GPU is visible (checked without touching other CUDA APIs)."""
    return bool(torch.backends.cuda.is_built()) and torch.cuda.is_available()


def require_cuda(what: str = "enable_cuda_graph=True") -> None:
    """Raise :class:`UnsupportedError` unless CUDA graphs can run here.

    Example:
        >>> import torch
        >>> if not torch.cuda.is_available():
        ...     try:
        ...         require_cuda()
        ...     except UnsupportedError as e:
        ...         print(str(e).split(";")[0])
        enable_cuda_graph=True needs a CUDA build of torch and a visible GPU
    """
    if cuda_graphs_available():
        return
    build = "a CPU-only build" if not torch.backends.cuda.is_built() else "a CUDA build, but no GPU is visible"
    raise UnsupportedError(
        f"{what} needs a CUDA build of torch and a visible GPU; this torch is {torch.__version__} ({build}). "
        "Set enable_cuda_graph=False (the decode engine then runs the same steps eagerly).")


class GraphCache:
    """Captured step graphs keyed by signature, bounded, least recently used evicted; see the module docstring."""

    def __init__(self, capacity: int = 8, warmup: int = 2, collectives: bool = False) -> None:
        if int(capacity) < 1:
            raise ValueError(f"cuda_graph_cache_size must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.warmup = int(warmup)
        #: The captured steps contain collectives (tensor parallelism): see the module docstring.
        self.collectives = bool(collectives)
        self._graphs: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._pool: Any = None
        self.stats = {"captures": 0, "replays": 0, "evictions": 0}

    @property
    def capture_mode(self) -> str:
        """``torch.cuda.graph``'s ``capture_error_mode``: ``thread_local`` with collectives, else ``global``.

        Example:
            >>> GraphCache(collectives=True).capture_mode, GraphCache().capture_mode
            ('thread_local', 'global')
        """
        return "thread_local" if self.collectives else "global"

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def keys(self) -> list:
        """Signatures held, least recently used first."""
        return list(self._graphs)

    def drop(self, predicate: Optional[Callable[[Hashable], bool]] = None) -> int:
        """Forget graphs whose key satisfies ``predicate`` (all when None); returns how many."""
        doomed = [k for k in self._graphs if predicate is None or predicate(k)]
        for k in doomed:
            del self._graphs[k]
        if not self._graphs:
            self._pool = None
        return len(doomed)

    def run(self, key: Hashable, fn: Callable[[], None], snapshot: Callable[[], Callable[[], None]]) -> None:
        """Replay the graph of ``key``, capturing ``fn`` first when the key is new.

        ``snapshot()`` returns a function that restores the buffers ``fn`` mutates (warm-up must not
        advance the real state).
        """
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(fn, snapshot)
            self._graphs[key] = graph
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
        else:
            self._graphs.move_to_end(key)
        graph.replay()
        self.stats["replays"] += 1

    def _capture(self, fn: Callable[[], None], snapshot: Callable[[], Callable[[], None]]) -> Any:
        require_cuda()
        restore = snapshot()
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn()
                restore()
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        if self.collectives:
            torch.cuda.synchronize()  # no eager all-reduce still in flight when the capture starts
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode=self.capture_mode):
            fn()
        # capture records without executing; the state is as the snapshot left it
        self.stats["captures"] += 1
        return graph
