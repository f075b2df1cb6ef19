"""Pieces shared by the GEMV-style Triton kernels (bf16 GEMV, int8/int4 GEMV): the activation load, the rows
a program reads and the epilogues (bias, then store; or bias, SwiGLU, store).

``load_act`` reads one activation row's K step as float32 (masked past ``k_end`` unless ``EVEN_K``);
``load_weight`` the same for a ``[BN, BK]`` tile of a 16-bit weight.

``tile_rows`` gives the weight rows of a program's ``BN``-row tile: ``pid_n * BN ...`` (clamped to ``N``), or,
``GATED``, the rows of ``BN // 2`` outputs of a fused gate|up weight (``2 N`` rows, gate first) interleaved:
gate row ``j``, up row ``N + j``, gate row ``j + 1``... ``store_gated`` then pairs them up in registers and
stores ``silu(gate) * up`` from the float32 sums (SwiGLU in the GEMV: no ``[2 N]`` intermediate, no
activation kernel; one activation row, no K split).

Each program holds a ``[BN, BM]`` tile of float32 sums (output rows x batch rows). With split-K the
partial sums are atomically added into a float32 output and only the first K split adds the bias; without
it the tile is cast to the output dtype and stored.

A Triton-only module (it imports triton): only the ``_*_triton`` kernel modules import it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_act(ptrs, kk, k_end, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptrs).to(tl.float32)
    return tl.load(ptrs, mask=kk < k_end, other=0.0).to(tl.float32)

@triton.jit
def load_weight(ptrs, kk, k_end, EVEN_K: tl.constexpr):
    """One K step of a streamed 16-bit weight tile (read once: evict first) as float32."""
    if EVEN_K:
        return tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
    return tl.load(ptrs, mask=(kk < k_end)[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32)

@triton.jit
def store_tile(Y, acc_t, B, rows, offs_m, offs_n, M, N, stride_ym, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(B + rows).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc_t += bias[:, None]
    y_ptrs = Y + offs_m[None, :] * stride_ym + offs_n[:, None]
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc_t, mask=mask)
    else:
        tl.store(y_ptrs, acc_t.to(Y.dtype.element_ty), mask=mask)

@triton.jit
def tile_rows(pid_n, N, BN: tl.constexpr, GATED: tl.constexpr):
    r = tl.arange(0, BN)
    if GATED:
        return (pid_n * (BN // 2) + r // 2) % N + (r % 2) * N
    return (pid_n * BN + r) % N  # clamped: out-of-range rows compute garbage that is never stored

@triton.jit
def store_gated(Y, acc, B, rows, pid_n, N, HAS_BIAS: tl.constexpr, BN: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(B + rows).to(tl.float32)
    gate, up = tl.split(tl.reshape(acc, (BN // 2, 2)))
    y = gate / (1.0 + tl.exp(-gate)) * up
    offs = pid_n * (BN // 2) + tl.arange(0, BN // 2)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=offs < N)
