"""Triton kernel of the gated-activation family (imported lazily by :mod:`policyinject.kernels.activations`).

``out = act(gate) * up`` over ``[M, N]`` rows; gate and up have their own row strides, so the two halves of
a fused ``gate_up [M, 2N]`` tensor are read in place (row stride ``2N``). Grid ``(cdiv(M, BLOCK_M),
cdiv(N, BLOCK_N))``. Activations (``ACT``): 0 SiLU, 1 GELU tanh approximation (written as
``x * sigmoid(2u)``, which equals ``0.5 x (1 + tanh(u))``), 2 exact GELU (erf). Float32 math.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gated_act_kernel(
    G,
    U,
    O,
    M,
    N,
    stride_gm,
    stride_um,
    stride_om,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2/pi) * (x + 0.044715 x^3)
        a = g * tl.sigmoid(2.0 * inner)
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    tl.store(O + rows[:, None] * stride_om + cols[None, :], (a * u).to(O.dtype.element_ty), mask=mask)
