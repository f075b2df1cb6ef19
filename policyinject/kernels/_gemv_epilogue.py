"""Pieces shared by the GEMV-style Triton kernels (bf16 GEMV, int8/int4 GEMV): the activation load and the
epilogue (bias, then store).

``load_act`` reads one activation row's K step as float32 (masked past ``k_end`` unless ``EVEN_K``).

Each program holds a ``[BN, BM]`` tile of float32 sums (output rows x batch rows). With split-K the
partial sums are atomically added into a float32 output and only the first K split adds the bias; without
it the tile is cast to the output dtype and stored.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def load_act(ptrs, kk, k_end, EVEN_K: tl.constexpr):
        if EVEN_K:
            return tl.load(ptrs).to(tl.float32)
        return tl.load(ptrs, mask=kk < k_end, other=0.0).to(tl.float32)

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
