"""The memory-bandwidth ceiling that every benchmark judges itself by: a large device-to-device copy.

Two ways to time it:

- :func:`copy_bandwidth` with its defaults (what the decode, breakdown and TP benchmarks use): one buffer
  pair, CUDA events around a single copy, median of ``repeats``. At 1 GiB this is the card's copy rate.
- :func:`steady_state_seconds`, the method of ``benchmarks/kernels.py``: several input/output sets (more bytes
  than the L2 holds) rotated across ``calls`` back-to-back calls captured in one CUDA graph; the replay is
  timed with CUDA events and divided by ``calls``. No cache flush runs in between (a flush leaves dirty L2
  lines whose write-back lands in the timed call), no host work is timed. ``copy_bandwidth(..., sets=4,
  graph=True)`` times the copy ceiling the same way, so a kernel and its ceiling are measured alike.

Example:
    >>> import torch
    >>> copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeats=3) > 0
    True
    >>> copy_bandwidth(torch.device("cpu"), nbytes=1 << 16, repeats=2, sets=4, calls=8, graph=True) > 0
    True
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["copy_bandwidth", "steady_state_seconds", "weight_bytes"]


def _per_call_loop(fn: Callable, sets: Sequence[Tuple], calls: int, keep: "collections.deque") -> None:
    n = len(sets)
    for i in range(calls):
        keep.append(fn(*sets[i % n]))


def steady_state_seconds(
    fn: Callable[..., Any],
    sets: Sequence[Tuple],
    *,
    calls: Optional[int] = None,
    repeats: int = 5,
    graph: bool = True,
    min_sample_s: float = 2e-3,
    device: Optional[torch.device] = None,
) -> float:
    """Seconds per call of ``fn(*sets[i % len(sets)])`` run back to back (median over ``repeats`` samples).

    ``calls`` consecutive calls (default: 32 rounded up to a multiple of ``len(sets)``) rotate over the sets;
    the outputs of the last ``len(sets)`` calls are kept alive, so outputs rotate over as many buffers as the
    inputs do. On CUDA with ``graph=True`` the calls are captured once in a CUDA graph (after one eager
    warm-up call per set, on a side stream) and each sample times enough replays to last ``min_sample_s``,
    with CUDA events: host overhead is excluded. With ``graph=False`` the calls run eagerly and the events
    measure what a host-bound loop gives (launch gaps included). Off CUDA the host clock times eager calls.

    Example:
        >>> import torch
        >>> sets = [(torch.ones(256), torch.empty(256)) for _ in range(4)]
        >>> steady_state_seconds(lambda s, d: d.copy_(s), sets, calls=8, repeats=2) > 0
        True
    """
    if not sets:
        raise ValueError("steady_state_seconds needs at least one input set")
    n = len(sets)
    calls = calls or 32
    calls = max(n, n * math.ceil(calls / n))
    if device is None:
        first = next((t for s in sets for t in s if isinstance(t, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    keep: collections.deque = collections.deque(maxlen=n)
    if device.type != "cuda":
        _per_call_loop(fn, sets, n, keep)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            _per_call_loop(fn, sets, calls, keep)
            times.append((time.perf_counter() - t0) / calls)
        keep.clear()
        return statistics.median(times)

    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles, allocator), as torch.cuda.graphs recommends
            _per_call_loop(fn, sets, n, keep)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        keep.clear()
        g: Optional[torch.cuda.CUDAGraph] = None
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                _per_call_loop(fn, sets, calls, keep)
            keep.clear()

            def run_once() -> None:
                g.replay()  # type: ignore[union-attr]
        else:

            def run_once() -> None:
                _per_call_loop(fn, sets, calls, keep)

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        run_once()
        run_once()  # warm replays: clocks up, L2 in steady state
        start.record()
        run_once()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end) / 1e3, 1e-7)
        per_sample = max(1, min(1000, math.ceil(min_sample_s / one)))
        times = []
        for _ in range(max(1, repeats)):
            start.record()
            for _ in range(per_sample):
                run_once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / (per_sample * calls))
        keep.clear()
    return statistics.median(times)  # the graph and its memory pool go with this frame


def copy_bandwidth(
    device: torch.device,
    nbytes: int = 1 << 30,
    repeats: int = 10,
    *,
    sets: int = 1,
    calls: int = 1,
    graph: bool = False,
) -> float:
    """Bytes read + written per second by copying ``nbytes`` on ``device`` (median of ``repeats``).

    Defaults: timed with CUDA events on a GPU (after one warm-up copy), with the host clock elsewhere; on the
    CPU the size is capped at 64 MiB. With ``sets > 1``, ``calls > 1`` or ``graph=True`` it is timed by
    :func:`steady_state_seconds` instead: ``sets`` source/destination pairs rotated over ``calls`` back-to-back
    copies (captured in a CUDA graph when ``graph``), the method ``benchmarks/kernels.py`` times kernels with.
    """
    cuda = device.type == "cuda"
    if not cuda:
        nbytes = min(nbytes, 1 << 26)
    if sets > 1 or calls > 1 or graph:
        pairs = []
        for _ in range(max(1, sets)):
            src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
            pairs.append((src, torch.empty_like(src)))
        sec = steady_state_seconds(lambda s, d: d.copy_(s), pairs, calls=max(calls, len(pairs)),
                                   repeats=repeats, graph=graph, device=device)
        del pairs
        return 2 * nbytes / sec
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> Dict[str, int]:
    """``{"all": ..., "read_per_token": ...}``: the model's weight bytes as stored (quantized weights, scales and
    zero points as such; :func:`policyinject.engine.parameter_bytes`), and the bytes a decode step reads, the
    roofline's numerator: all of them but an untied input embedding, of which a step reads one row per token.

    Example:
        >>> class LM(torch.nn.Module):  # untied: a 10 x 4 float32 embedding and a 10 x 4 head
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
        ...     def get_input_embeddings(self): return self.embed
        ...     def get_output_embeddings(self): return self.head
        >>> weight_bytes(LM())
        {'all': 320, 'read_per_token': 160}
    """
    from ..engine import parameter_bytes

    total = parameter_bytes(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    read = total
    if embed is not None and getattr(embed, "weight", None) is not None:
        tied = head is not None and getattr(head, "weight", None) is embed.weight
        if not tied:
            read -= embed.weight.numel() * embed.weight.element_size()
    return {"all": total, "read_per_token": read}
