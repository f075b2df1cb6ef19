#!/usr/bin/env python
"""GPU benchmark of the memory-bound kernels (norms, rotary, gated activations) against PyTorch.

Run on a CUDA machine from the repository root::

    python benchmarks/kernels.py --json out/kernels.json   # full run (about 3 min on an H100)
    python benchmarks/kernels.py --quick               # headline shapes only, no torch.compile, no sweeps
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # CPU: tiny shapes, host clock (plumbing only)

What it does, in one process:

1. prints the card, torch, triton and transformers versions;
2. measures the copy ceiling: a 1 GiB device-to-device ``copy_`` (bytes read + written), timed three ways
   (steady state as the kernels below, a single event-timed copy, do_bench with an L2 flush); the ceiling is
   the fastest of the three (on the H100 the rotated 1 GiB pairs read slower: 2.43 vs 2.96 TB/s);
3. for each kernel and shape: checks ours against the reference on fresh random inputs (outputs poisoned
   with NaN, relative error by norm), then times ours, the PyTorch reference (eager), the Hugging Face
   module where there is one (eager), ``torch.compile`` of the reference (headline shapes), and a plain
   ``copy_`` moving the same number of bytes;
4. sweeps the launch parameters of the headline shapes with the same timing;
5. prints a table and, for each headline kernel, the verdict against 85% of the 1 GiB copy rate;
   ``--json`` writes everything.

Timing ("steady state", every column unless said otherwise): ``S >= 4`` input/output sets (together
>= 4x the 50 MB L2 where the shape allows, at most 16 sets) rotated over ``N`` back-to-back calls captured in
one CUDA graph; the graph is replayed (warm-up first) and timed with CUDA events; time per call = total / N.
Nothing runs between the calls: no L2 flush, no host work. This is how a kernel runs inside a model (and
inside our graphed decode step). Extra columns, for transparency:

- ``flushed``: ``triton.testing.do_bench`` median with a 256 MB L2 flush before each call (the old number).
  The flush leaves up to ~50 MB of dirty L2 lines whose write-back to DRAM lands inside the timed call, and
  when the host takes longer per iteration than the flush + kernel take on the GPU, the start event fires
  while the GPU waits for the launch: host time is then counted as kernel time.
- ``eager``: the same rotated calls run eagerly back to back (events around the loop / N): what an eager
  caller sees, host launch overhead included where it exceeds the GPU time. ``host``: CPU time per call.

Target (issue): memory-bound kernels at >= 85% of the measured 1 GiB copy rate at realistic sizes
(e.g. RMSNorm 4096 x 4096 bf16). Exit status 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from policyinject.testing.roofline import copy_bandwidth, steady_state_seconds  # noqa: E402

L2_BYTES = 50 * 2**20  # H100: 50 MB
MIN_SETS, MAX_SETS = 4, 16
GRAPH_CALLS = 32  # calls per captured graph (rounded up to a multiple of the number of sets)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
TARGET = 0.85

# Shapes (the first of each list is the headline shape: torch.compile baseline, target check).
NORM_SHAPES = [(4096, 4096), (32, 4096), (1, 4096)]  # rows x hidden
ROPE_SHAPES = [(1, 32, 8, 4096, 128), (1, 32, 8, 1, 128), (64, 32, 8, 1, 128)]  # B, Hq, Hkv, T, D
ACT_SHAPES = [(4096, 14336), (32, 14336), (1, 14336)]  # rows x intermediate
SWEEP_NORM = (4096, 4096)
SWEEP_ROPE = (1, 32, 8, 4096, 128)
SWEEP_ACT = (4096, 14336)

# --smoke (CPU, TRITON_INTERPRET=1): tiny shapes, few configs; checks the plumbing, the numbers mean nothing
SMOKE_NORM_SHAPES = [(8, 64), (1, 64)]
SMOKE_ROPE_SHAPES = [(1, 4, 2, 3, 16), (2, 4, 2, 1, 16)]
SMOKE_ACT_SHAPES = [(4, 64)]


# ------------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def poisoned_alloc() -> Iterator[None]:
    """torch.empty / empty_like return NaN-filled floating tensors inside the block (unwritten outputs show)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    d = r.norm().item()
    return (o - r).norm().item() / (d if d > 0 else 1.0)


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def n_sets(bytes_per_set: int) -> int:
    """Input/output sets to rotate: enough for 4x L2 in total, at least 4, at most 16 (tiny shapes stay in L2,
    as they do in a model)."""
    return max(MIN_SETS, min(MAX_SETS, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))))


class Rotating:
    """Calls ``fn(*inputs[i])`` with i cycling over several input sets (for do_bench, which takes no args)."""

    def __init__(self, fn: Callable, sets: Sequence[Tuple]) -> None:
        self.fn, self.sets, self.i = fn, list(sets), 0

    def __call__(self) -> Any:
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


class Timer:
    """The three ways a callable is timed here (all in microseconds per call; see the module docstring)."""

    def __init__(self, cuda: bool, calls: int, repeats: int, rep_ms: int) -> None:
        self.cuda, self.calls, self.repeats, self.rep_ms = cuda, calls, repeats, rep_ms

    def steady(self, fn: Callable, sets: Sequence[Tuple]) -> float:
        """Graph-captured back-to-back calls rotating over ``sets`` (host clock off CUDA)."""
        return 1e6 * steady_state_seconds(fn, sets, calls=self.calls, repeats=self.repeats, graph=self.cuda)

    def eager(self, fn: Callable, sets: Sequence[Tuple]) -> Tuple[float, float]:
        """(us per call of an eager back-to-back loop, host us per call to issue it)."""
        n = len(sets)
        calls = max(n, n * math.ceil(self.calls / n))
        for s in sets:
            fn(*s)
        self.sync()
        best = (float("inf"), float("inf"))
        for _ in range(max(1, self.repeats)):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for i in range(calls):
                fn(*sets[i % n])
            host = time.perf_counter() - t0
            if self.cuda:
                end.record()
                end.synchronize()
                total = start.elapsed_time(end) / 1e3
            else:
                total = host
            best = min(best, (1e6 * total / calls, 1e6 * host / calls))
        return best

    def flushed(self, fn: Callable, sets: Sequence[Tuple]) -> float:
        """The old number: do_bench median, 256 MB L2 flush before every call (CUDA only)."""
        if not self.cuda:
            return float("nan")
        from triton.testing import do_bench

        ms = do_bench(Rotating(fn, sets), warmup=max(10, self.rep_ms // 4), rep=self.rep_ms, return_mode="median")
        return 1000.0 * float(ms)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One kernel at one shape. ``make()`` returns one input set (tuple); the callables take ``*set``."""

    kernel: str
    shape: str
    dtype: torch.dtype
    make: Callable[[], Tuple]
    ours: Callable
    reference: Callable
    moved: Callable[[Tuple], int]  # fewest bytes to move for one call
    hf: Optional[Callable] = None
    compile_ref: bool = False
    headline: bool = False
    note: str = ""


@dataclass
class Result:
    kernel: str
    shape: str
    dtype: str
    bytes: int
    ok: bool
    max_rel_err: float
    sets: int = 0
    calls: int = 0
    ours_us: float = float("nan")  # steady state (graph)
    tbps: float = float("nan")
    frac_copy: float = float("nan")  # of the 1 GiB copy rate (steady state)
    copy_same_us: float = float("nan")  # copy_ of the same bytes, steady state
    frac_copy_same: float = float("nan")
    flushed_us: float = float("nan")  # do_bench with L2 flush (the old method)
    eager_us: float = float("nan")  # eager back-to-back loop (host overhead included when it dominates)
    host_us: float = float("nan")  # CPU time per eager call
    ref_eager_us: float = float("nan")
    hf_eager_us: float = float("nan")
    compiled_us: float = float("nan")
    speedup_vs_eager: float = float("nan")
    headline: bool = False
    error: str = ""
    notes: List[str] = field(default_factory=list)


def _then_norm(norm: Callable, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return norm(s), s


def _as_tuple(x: Any) -> Tuple:
    return x if isinstance(x, tuple) else (x,)


def build_cases(quick: bool, dev: str, smoke: bool = False) -> List[Case]:
    from policyinject.kernels import activations as A
    from policyinject.kernels import norms as N
    from policyinject.kernels import reference as R
    from policyinject.kernels.rotary import rotary
    from policyinject.modules import _ops

    try:
        from transformers.models.llama import modeling_llama as hf_llama
    except Exception:  # transformers missing: no HF baselines
        hf_llama = None

    cases: List[Case] = []
    dt = torch.bfloat16  # the kernels upcast after loading, so bf16 runs under the interpreter too

    def randn(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dtype)

    norm_list = SMOKE_NORM_SHAPES if smoke else NORM_SHAPES
    rope_list = SMOKE_ROPE_SHAPES if smoke else ROPE_SHAPES
    act_list = SMOKE_ACT_SHAPES if smoke else ACT_SHAPES

    # ---- norms
    hf_rms_cache: Dict[int, Any] = {}

    def hf_rms(w: torch.Tensor, eps: float) -> Any:
        key = id(w)
        if key not in hf_rms_cache:
            m = hf_llama.LlamaRMSNorm(w.numel(), eps=eps).to(dev, w.dtype)
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            hf_rms_cache[key] = m
        return hf_rms_cache[key]

    for m, n in (norm_list[:1] if quick else norm_list):
        head = (m, n) == norm_list[0]
        w, b = randn(n), randn(n)
        shape = f"{m}x{n}"

        def mk(m: int = m, n: int = n) -> Tuple:
            return (randn(m, n),)

        def mk2(m: int = m, n: int = n) -> Tuple:
            return (randn(m, n), randn(m, n))

        cases.append(Case(
            "rms_norm", shape, dt, mk,
            ours=lambda x, w=w: N.rms_norm(x, w, 1e-6, backend="triton"),
            reference=lambda x, w=w: R.rms_norm(x, w, 1e-6),
            moved=lambda s, w=w: 2 * nbytes(s[0]) + nbytes(w),
            hf=(lambda x, w=w: hf_rms(w, 1e-6)(x)) if hf_llama else None,
            compile_ref=head, headline=head,
        ))
        cases.append(Case(
            "add_rms_norm", shape, dt, mk2,
            ours=lambda x, r, w=w: N.add_rms_norm(x, r, w, 1e-6, backend="triton"),
            reference=lambda x, r, w=w: R.add_rms_norm(x, r, w, 1e-6),
            moved=lambda s, w=w: 4 * nbytes(s[0]) + nbytes(w),
            hf=(lambda x, r, w=w: _then_norm(hf_rms(w, 1e-6), x + r)) if hf_llama else None,
            compile_ref=head, headline=head,
        ))
        ln = torch.nn.LayerNorm(n, eps=1e-5, device=dev, dtype=dt)
        with torch.no_grad():
            ln.weight.copy_(w)
            ln.bias.copy_(b)
        ln.requires_grad_(False)
        cases.append(Case(
            "layer_norm", shape, dt, mk,
            ours=lambda x, w=w, b=b: N.layer_norm(x, w, b, 1e-5, backend="triton"),
            reference=lambda x, w=w, b=b: R.layer_norm(x, w, b, 1e-5),
            moved=lambda s, w=w: 2 * nbytes(s[0]) + 2 * nbytes(w),
            hf=lambda x, ln=ln: ln(x),
            headline=head,
        ))
        cases.append(Case(
            "add_layer_norm", shape, dt, mk2,
            ours=lambda x, r, w=w, b=b: N.add_layer_norm(x, r, w, b, 1e-5, backend="triton"),
            reference=lambda x, r, w=w, b=b: R.add_layer_norm(x, r, w, b, 1e-5),
            moved=lambda s, w=w: 4 * nbytes(s[0]) + 2 * nbytes(w),
            hf=lambda x, r, ln=ln: _then_norm(ln, x + r),
            headline=head,
        ))

    # ---- rotary. The injected attention calls policyinject.modules._ops.rotary on q/k that are transposed
    # views of one fused qkv projection [B, T, (Hq + 2 Hkv) D] (QKVLayout.BLOCKS: q | k | v per token), with
    # the model's cos/sin [B, T, D] in the model dtype. That is the main case. "rotary (q,k separate)" is the
    # layout of the earlier logs (separate projections) through the public rotary(). Bytes: q and k read and
    # written, cos and sin read once (fewest bytes; v is not touched).
    def rope_tables(b: int, t: int, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
        pos = torch.arange(t, device=dev, dtype=torch.float32) + 123
        emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
        return (emb.cos()[None].expand(b, t, d).to(dt).contiguous(),
                emb.sin()[None].expand(b, t, d).to(dt).contiguous())

    def rope_moved(s_: Tuple, c: torch.Tensor) -> int:
        return 2 * nbytes(s_[0], s_[1]) + 2 * nbytes(c)

    for b_, hq, hkv, t, d in (rope_list[:1] if quick else rope_list):
        head = (b_, hq, hkv, t, d) == rope_list[0]
        cos, sin = rope_tables(b_, t, d)
        shape = f"q{b_}x{hq}x{t}x{d} k{b_}x{hkv}x{t}x{d}"

        def mk_fused(b_: int = b_, hq: int = hq, hkv: int = hkv, t: int = t, d: int = d) -> Tuple:
            qkv = randn(b_, t, (hq + 2 * hkv) * d)
            q, k, _v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            return (q.view(b_, t, hq, d).transpose(1, 2), k.view(b_, t, hkv, d).transpose(1, 2))

        def mk_sep(b_: int = b_, hq: int = hq, hkv: int = hkv, t: int = t, d: int = d) -> Tuple:
            q = randn(b_, t, hq * d).view(b_, t, hq, d).transpose(1, 2)
            k = randn(b_, t, hkv * d).view(b_, t, hkv, d).transpose(1, 2)
            return (q, k)

        hf_rope = (lambda q, k, c=cos, s=sin: hf_llama.apply_rotary_pos_emb(q, k, c, s)) if hf_llama else None
        cases.append(Case(
            "rotary", shape, dt, mk_fused,
            ours=lambda q, k, c=cos, s=sin: _ops.rotary(q, k, c, s, "half", "triton"),
            reference=lambda q, k, c=cos, s=sin: R.rotary(q, k, c, s),
            moved=lambda s_, c=cos: rope_moved(s_, c),
            hf=hf_rope, compile_ref=head, headline=head,
            note="q/k: views of a fused qkv projection, via modules._ops.rotary (the injected model's call)",
        ))
        if head and not quick:
            cases.append(Case(
                "rotary (q,k separate)", shape, dt, mk_sep,
                ours=lambda q, k, c=cos, s=sin: rotary(q, k, c, s, backend="triton"),
                reference=lambda q, k, c=cos, s=sin: R.rotary(q, k, c, s),
                moved=lambda s_, c=cos: rope_moved(s_, c),
                hf=hf_rope,
                note="q/k from separate projections, public rotary(): the layout of the earlier logs",
            ))
            cases.append(Case(
                "rotary_inplace", shape, dt, mk_fused,
                ours=lambda q, k, c=cos, s=sin: rotary(q, k, c, s, inplace=True, backend="triton"),
                reference=lambda q, k, c=cos, s=sin: R.rotary(q, k, c, s),
                moved=lambda s_, c=cos: rope_moved(s_, c),
            ))

    # ---- gated activations (LlamaMLP: act(gate) * up; HF eager = ACT2FN["silu"](gate) * up)
    for m, i in (act_list[:1] if quick else act_list):
        head = (m, i) == act_list[0]
        shape = f"{m}x{i}"

        def mk_gu(m: int = m, i: int = i) -> Tuple:
            return (randn(m, i), randn(m, i))

        cases.append(Case(
            "swiglu", shape, dt, mk_gu,
            ours=lambda g, u: A.swiglu(g, u, backend="triton"),
            reference=lambda g, u: R.swiglu(g, u),
            moved=lambda s_: 3 * nbytes(s_[0]),
            hf=lambda g, u: torch.nn.functional.silu(g) * u,
            compile_ref=head, headline=head,
        ))
        if not quick:
            cases.append(Case(
                "geglu_tanh", shape, dt, mk_gu,
                ours=lambda g, u: A.geglu(g, u, "tanh", backend="triton"),
                reference=lambda g, u: R.geglu(g, u, "tanh"),
                moved=lambda s_: 3 * nbytes(s_[0]),
                hf=lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u,
            ))

        def mk_fused_gu(m: int = m, i: int = i) -> Tuple:
            return (randn(m, 2 * i),)

        cases.append(Case(
            "gated_act(silu, fused)", f"{m}x{2 * i}", dt, mk_fused_gu,
            ours=lambda gu: A.gated_act(gu, "silu", backend="triton"),
            reference=lambda gu: R.gated_act(gu, "silu"),
            moved=lambda s_: nbytes(s_[0]) + nbytes(s_[0]) // 2,
            hf=lambda gu: torch.nn.functional.silu(gu[:, : gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2 :],
            headline=head,
        ))
    return cases


# ---------------------------------------------------------------------------------------------- running


def check(case: Case, timer: Timer) -> Tuple[bool, float]:
    """Fresh inputs, outputs poisoned with NaN, rel error of every output vs the reference."""
    inputs = case.make()
    refs = _as_tuple(case.reference(*inputs))  # first: an in-place kernel overwrites its inputs
    with poisoned_alloc():
        outs = _as_tuple(case.ours(*inputs))
    timer.sync()
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    worst = max(errs)
    return worst <= TOL[case.dtype] and len(outs) == len(refs), worst


class CopyRef:
    """``dst.copy_(src)`` moving a given number of bytes (read + write), timed like the kernels; cached."""

    def __init__(self, dev: str, timer: Timer) -> None:
        self.dev, self.timer, self.cache = dev, timer, {}  # type: Dict[Tuple[int, int], float]

    def us(self, moved: int, sets: int) -> float:
        size = max(1, moved // 2)
        key = (size, sets)
        if key not in self.cache:
            pairs = []
            for _ in range(sets):
                src = torch.empty(size, dtype=torch.uint8, device=self.dev).random_()
                pairs.append((src, torch.empty_like(src)))
            self.cache[key] = self.timer.steady(lambda s, d: d.copy_(s), pairs)
            del pairs
        return self.cache[key]


def run_case(case: Case, copy_tbps: float, timer: Timer, copies: CopyRef, do_compile: bool,
             flushed: bool) -> Result:
    res = Result(case.kernel, case.shape, str(case.dtype).replace("torch.", ""), 0, False, float("nan"),
                 headline=case.headline)
    if case.note:
        res.notes.append(case.note)
    try:
        res.ok, res.max_rel_err = check(case, timer)
        one = case.make()
        res.bytes = case.moved(one)
        per_set = res.bytes  # inputs + outputs of one call
        sets = [one] + [case.make() for _ in range(n_sets(per_set) - 1)]
        res.sets = len(sets)
        res.calls = max(len(sets), len(sets) * math.ceil(timer.calls / len(sets)))
        res.ours_us = timer.steady(case.ours, sets)
        res.tbps = res.bytes / (res.ours_us * 1e-6) / 1e12
        res.frac_copy = res.tbps / copy_tbps
        try:
            res.copy_same_us = copies.us(res.bytes, len(sets))
            res.frac_copy_same = res.copy_same_us / res.ours_us
        except Exception as e:
            res.notes.append(f"same-size copy failed: {type(e).__name__}: {str(e)[:200]}")
        res.eager_us, res.host_us = timer.eager(case.ours, sets)
        if flushed:
            res.flushed_us = timer.flushed(case.ours, sets)
        res.ref_eager_us = _baseline(res, "reference", timer, case.reference, sets)
        if case.hf is not None:
            res.hf_eager_us = _baseline(res, "hf baseline", timer, case.hf, sets)
        if do_compile and case.compile_ref:
            try:
                compiled = torch.compile(case.reference, dynamic=False)
                compiled(*sets[0])
                res.compiled_us = _baseline(res, "torch.compile", timer, compiled, sets)
            except Exception as e:
                res.notes.append(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
        eager = res.hf_eager_us if not math.isnan(res.hf_eager_us) else res.ref_eager_us
        res.speedup_vs_eager = eager / res.ours_us
        del sets, one
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return res


def _baseline(res: Result, what: str, timer: Timer, fn: Callable, sets: List[Tuple]) -> float:
    """Steady-state time of a baseline; falls back to the eager loop if it cannot be captured in a graph."""
    try:
        return timer.steady(fn, sets)
    except Exception as e:  # a baseline failing must not hide our numbers
        res.notes.append(f"{what}: graph capture failed ({type(e).__name__}: {str(e)[:120]}); eager loop time")
        try:
            timer.sync()
            return timer.eager(fn, sets)[0]
        except Exception as e2:
            res.notes.append(f"{what} failed: {type(e2).__name__}: {str(e2)[:200]}")
            return float("nan")


# ------------------------------------------------------------------------------------------------ sweeps


def sweeps(dev: str, copy_tbps: float, timer: Timer, sms: int, smoke: bool = False) -> List[Dict[str, Any]]:
    """Time launch configurations of the headline shapes; returns rows (default first per kernel)."""
    from policyinject.kernels.activations import ActConfig, act_config, launch_gated_act
    from policyinject.kernels.norms import NormConfig, launch_norm, norm_config
    from policyinject.kernels.rotary import RotaryConfig, launch_rotary, rotary_config

    rows: List[Dict[str, Any]] = []
    bf16 = torch.bfloat16
    limit = 3 if smoke else None

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev).to(bf16)

    def sweep(name: str, configs: List[Any], default: Any, run: Callable, sets: List[Tuple], moved: int) -> None:
        todo = [default] + [c for c in configs if c != default]
        for cfg in todo[:limit]:
            row: Dict[str, Any] = {"kernel": name, "config": asdict(cfg), "default": cfg == default}
            try:
                us = timer.steady(lambda *a, cfg=cfg: run(*a, cfg), sets)
                row.update(us=us, tbps=moved / (us * 1e-6) / 1e12, frac_copy=moved / (us * 1e-6) / 1e12 / copy_tbps)
            except Exception as e:
                row.update(us=float("nan"), error=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)

    # norms
    m, n = (8, 64) if smoke else SWEEP_NORM
    w, bias = randn(n), randn(n)
    sets = [(randn(m, n), randn(m, n)) for _ in range(n_sets(4 * m * n * 2))]
    norm_cfgs = [NormConfig(bm, nw, stream=st) for bm in (1, 2, 4) for nw in (2, 4, 8, 16) for st in (False, True)
                 if bm * n // (nw * 32) >= 8]
    norm_cfgs += [NormConfig(bm, nw, sms * k, 1, st) for bm in (1, 2) for nw in (4, 8) for k in (4, 8, 16)
                  for st in (False, True)]
    sweep(f"rms_norm {m}x{n}", norm_cfgs, norm_config(m, n, sms),
          lambda x, r, cfg: launch_norm(x, None, w, None, 1e-6, 0.0, True, cfg), sets, 2 * m * n * 2)
    sweep(f"layer_norm {m}x{n}", norm_cfgs, norm_config(m, n, sms),
          lambda x, r, cfg: launch_norm(x, None, w, bias, 1e-5, 0.0, False, cfg), sets, 2 * m * n * 2)
    sweep(f"add_rms_norm {m}x{n}", norm_cfgs[::2], norm_config(m, n, sms),
          lambda x, r, cfg: launch_norm(x, r, w, None, 1e-6, 0.0, True, cfg), sets, 4 * m * n * 2)
    del sets

    # rotary prefill, q/k as views of a fused qkv projection (the injected model's layout)
    b, hq, hkv, t, d = (1, 4, 2, 3, 16) if smoke else SWEEP_ROPE
    cos = torch.randn(b, t, d, device=dev).to(bf16)
    sin = torch.randn(b, t, d, device=dev).to(bf16)
    moved = 2 * (b * t * (hq + hkv) * d * 2) + 2 * b * t * d * 2

    def qk() -> Tuple:
        q, k, _ = randn(b, t, (hq + 2 * hkv) * d).split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(b, t, hq, d).transpose(1, 2), k.view(b, t, hkv, d).transpose(1, 2)

    sets = [qk() for _ in range(n_sets(moved))]
    rcfgs = [RotaryConfig(bh, nw) for bh in (2, 4, 8, 16, 32) for nw in (1, 2, 4, 8)]
    sweep(f"rotary q{b}x{hq}x{t}x{d} k{b}x{hkv}x{t}x{d}", rcfgs, rotary_config(b * t, hq, hkv, d, sms),
          lambda q, k, cfg: launch_rotary(q, k, cos, sin, "half", None, False, cfg), sets, moved)
    del sets

    # swiglu
    m, i = (4, 64) if smoke else SWEEP_ACT
    sets = [(randn(m, i), randn(m, i)) for _ in range(n_sets(3 * m * i * 2))]
    acfgs = [ActConfig(bm, bn, nw) for bn in (512, 1024, 2048, 4096) for bm in (1, 2, 4, 8) for nw in (4, 8)
             if 1024 <= bm * bn <= 8192]
    sweep(f"swiglu {m}x{i}", acfgs, act_config(m, i, sms),
          lambda g, u, cfg: launch_gated_act(g, u, "silu", cfg), sets, 3 * m * i * 2)
    del sets
    if timer.cuda:
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ output


def fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(results: List[Result], copy_tbps: float, copy_old_tbps: float) -> None:
    head = (f"{'kernel':<22} {'shape':<28} {'dtype':<8} {'MB':>8} {'ours us':>8} {'TB/s':>5} {'%copy1G':>7} "
            f"{'%copySS':>7} {'flushed':>8} {'eager':>7} {'host':>6} {'HF eager':>9} {'ref eager':>9} "
            f"{'compiled':>8} {'speedup':>7} {'rel err':>8} ok")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.kernel:<22} {r.shape:<28} {r.dtype:<8} {r.bytes / 1e6:>8.2f} {fmt(r.ours_us, '8.1f')} "
              f"{fmt(r.tbps, '5.2f')} {fmt(100 * r.frac_copy, '6.1f')}% {fmt(100 * r.frac_copy_same, '6.1f')}% "
              f"{fmt(r.flushed_us, '8.1f')} {fmt(r.eager_us, '7.1f')} {fmt(r.host_us, '6.1f')} "
              f"{fmt(r.hf_eager_us, '9.1f')} {fmt(r.ref_eager_us, '9.1f')} {fmt(r.compiled_us, '8.1f')} "
              f"{fmt(r.speedup_vs_eager, '6.2f')}x {r.max_rel_err:8.1e} {'OK' if r.ok else 'FAIL ' + r.error[:60]}")
    print(f"(ours / HF eager / ref eager / compiled / copySS: steady state, {GRAPH_CALLS}+ calls rotating over "
          f"{MIN_SETS}-{MAX_SETS} input/output sets in one CUDA graph, per call; %copy1G: of the 1 GiB copy ceiling "
          f"{copy_tbps:.3f} TB/s, the fastest of its steady-state, single-copy ({fmt(copy_old_tbps, '.3f')} TB/s) "
          f"and flushed timings; "
          f"%copySS: a copy_ moving the same bytes / ours; flushed: do_bench median with L2 flush (old method); "
          f"eager: eager back-to-back loop per call, host: its CPU time per call; speedup = HF eager (else "
          f"reference eager) / ours)")


def print_sweeps(rows: List[Dict[str, Any]]) -> None:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["kernel"], []).append(r)
    for name, rs in by.items():
        ok = sorted([r for r in rs if not math.isnan(r.get("us", float("nan")))], key=lambda r: r["us"])
        default = next((r for r in rs if r["default"]), None)
        print(f"sweep {name}: default {default['config'] if default else '?'} "
              f"{fmt(default.get('us', float('nan')) if default else float('nan'), '.2f')} us "
              f"({fmt(100 * default.get('frac_copy', float('nan')) if default else float('nan'), '.1f')}% copy)")
        for r in ok[:4]:
            print(f"    {fmt(r['us'], '8.2f')} us  {fmt(100 * r['frac_copy'], '5.1f')}%  {r['config']}")
        if ok:
            print(f"    ({len(ok)} configs, slowest {ok[-1]['us']:.2f} us)")
        bad = [r for r in rs if "error" in r]
        if bad:
            print(f"    {len(bad)} configs failed, e.g. {bad[0]['config']}: {bad[0]['error']}")


def print_verdicts(results: List[Result]) -> None:
    for r in results:
        if not r.headline or math.isnan(r.frac_copy):
            continue
        verdict = "meets" if r.frac_copy >= TARGET else "misses"
        print(f"target: {r.kernel} {r.shape} {r.dtype} at {100 * r.frac_copy:.1f}% of the 1 GiB copy rate "
              f"({100 * r.frac_copy_same:.1f}% of a same-size copy; flushed {fmt(r.flushed_us, '.1f')} us) "
              f"{verdict} the {100 * TARGET:.0f}% goal")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="headline shapes only, no torch.compile, no sweeps")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, few sweep configs; runs on the CPU under TRITON_INTERPRET=1 (plumbing test)")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweeps")
    ap.add_argument("--no-flushed", action="store_true", help="skip the do_bench (L2-flushed) column")
    ap.add_argument("--calls", type=int, default=GRAPH_CALLS, help="calls per captured graph")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per measurement (median)")
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench repetition time for the flushed column")
    ap.add_argument("--budget-s", type=float, default=400.0, help="skip optional parts once this much time is used")
    args = ap.parse_args(argv)
    t0 = time.time()

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--smoke runs a CPU plumbing test under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    import triton

    dev = "cuda" if cuda else "cpu"
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:
        tf_version = "not installed"
    rep_ms = args.rep_ms or (40 if args.quick else 100)
    repeats = args.repeats or (2 if args.smoke else 5)
    calls = 4 if (args.smoke and not cuda) else args.calls
    timer = Timer(cuda, calls, repeats, rep_ms)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        card, sms = torch.cuda.get_device_name(0), props.multi_processor_count
        print(f"device: {card} ({sms} SMs, {props.total_memory / 2**30:.0f} GiB, L2 "
              f"{getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB); torch {torch.__version__}, "
              f"triton {triton.__version__}, transformers {tf_version}, python {platform.python_version()}",
              flush=True)
    else:
        card, sms = f"cpu ({platform.processor() or platform.machine()}), TRITON_INTERPRET=1", 132
        print(f"device: {card}: plumbing smoke test, times are meaningless; torch {torch.__version__}, "
              f"triton {triton.__version__}, transformers {tf_version}", flush=True)

    torch.manual_seed(0)
    device = torch.device(dev)
    big = (1 << 30) if cuda else (1 << 20)
    copy_sets = 4 if cuda else 2
    copy_tbps = copy_bandwidth(device, big, repeats=repeats, sets=copy_sets, calls=8 if cuda else 2,
                               graph=cuda) / 1e12
    copy_old_tbps = copy_bandwidth(device, big, repeats=10 if cuda else 2) / 1e12
    copy_flushed_tbps = float("nan")
    if cuda and not args.no_flushed:
        src = torch.empty(big, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        copy_flushed_tbps = 2 * big / (timer.flushed(lambda s, d: d.copy_(s), [(src, dst)]) * 1e-6) / 1e12
        del src, dst
        torch.cuda.empty_cache()
    print(f"copy ceiling, {big / 2**30:.3g} GiB copy_ (read + write): {copy_tbps:.3f} TB/s steady state "
          f"({copy_sets} buffer pairs rotated, CUDA graph); {copy_old_tbps:.3f} TB/s single copy "
          f"(policyinject.testing.roofline default); {fmt(copy_flushed_tbps, '.3f')} TB/s do_bench with L2 flush", flush=True)
    # The ceiling is the fastest of the three copy measurements: the rotated 1 GiB pairs span 8 GiB and read
    # slower on the H100 (2.43 vs 2.96 TB/s, session-2 run 2, likely TLB reach), so judging by them would be
    # lenient; the kernels' own rotating sets span at most ~1 GiB.
    steady_copy_tbps = copy_tbps
    copy_tbps = max(x for x in (steady_copy_tbps, copy_old_tbps, copy_flushed_tbps) if x == x)
    print(f"ceiling used for %copy1G and the 85% verdicts: {copy_tbps:.3f} TB/s (the fastest of the three)", flush=True)

    cases = build_cases(args.quick, dev, smoke=args.smoke)
    copies = CopyRef(dev, timer)
    results: List[Result] = []
    do_compile = cuda and not (args.quick or args.no_compile)
    for case in cases:
        over = time.time() - t0 > args.budget_s
        r = run_case(case, copy_tbps, timer, copies, do_compile and not over, flushed=not args.no_flushed)
        if over and case.compile_ref and do_compile:
            r.notes.append("torch.compile skipped: time budget")
        results.append(r)
        print(f"  {r.kernel:<22} {r.shape:<28} ours {fmt(r.ours_us, '.2f')} us, {fmt(r.tbps, '.2f')} TB/s "
              f"({fmt(100 * r.frac_copy, '.1f')}% copy1G, {fmt(100 * r.frac_copy_same, '.1f')}% same-size copy "
              f"{fmt(r.copy_same_us, '.2f')} us), flushed {fmt(r.flushed_us, '.1f')}, eager {fmt(r.eager_us, '.1f')}"
              f" (host {fmt(r.host_us, '.1f')}), {r.sets} sets x {r.calls} calls, rel err {r.max_rel_err:.1e} "
              f"{'OK' if r.ok else 'FAIL'} {r.error} {'; '.join(r.notes)} [{time.time() - t0:.0f}s]", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    sweep_rows: List[Dict[str, Any]] = []
    if not (args.quick or args.no_sweep):
        if time.time() - t0 < args.budget_s:
            try:
                sweep_rows = sweeps(dev, copy_tbps, timer, sms, smoke=args.smoke)
            except Exception:
                traceback.print_exc()
        else:
            print("sweeps skipped: time budget")

    if sweep_rows:
        print()
        print_sweeps(sweep_rows)
    print()
    print_table(results, copy_tbps, copy_old_tbps)
    print_verdicts(results)
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} cases, {len(failed)} failed correctness or errored; total {time.time() - t0:.0f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": card, "sms": sms, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": tf_version, "copy_tbps": copy_tbps, "copy_steady_tbps": steady_copy_tbps,
            "copy_single_tbps": copy_old_tbps,
            "copy_flushed_tbps": copy_flushed_tbps, "copy_bytes": big,
            "timing": {"method": "cuda-graph steady state" if cuda else "host clock (smoke)",
                       "calls": calls, "repeats": repeats, "min_sets": MIN_SETS, "max_sets": MAX_SETS,
                       "l2_bytes_assumed": L2_BYTES, "flushed_rep_ms": rep_ms},
            "quick": args.quick, "smoke": args.smoke,
            "results": [asdict(r) for r in results], "sweeps": sweep_rows, "seconds": time.time() - t0,
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
