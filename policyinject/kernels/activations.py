"""Gated MLP activations: SwiGLU and GeGLU (tanh approximation or exact), from separate gate/up tensors or
from one fused ``gate_up`` tensor (first half gate, second half up).

Functional API (``backend="auto" | "triton" | "torch"``)::

    swiglu(gate, up, *, backend="auto")                        # silu(gate) * up
    geglu(gate, up, approximate="tanh", *, backend="auto")     # gelu(gate, approximate) * up
    gated_act(gate_up, activation="silu", *, backend="auto")   # act(gate_up[..., :I]) * gate_up[..., I:]

This is what Hugging Face's gated MLPs compute between their projections: ``LlamaMLP`` is
``down(silu(gate(x)) * up(x))``; Gemma's ``gelu_pytorch_tanh`` is GELU with the tanh approximation
(= ``NewGELUActivation``/``gelu_new``), ``gelu`` the exact erf GELU. ``activation`` takes ``"silu"``,
``"gelu_tanh"``, ``"gelu"`` or an HF alias (:data:`policyinject.kernels.reference.ACTIVATIONS`).

Any leading dims, any last dim, fp32/fp16/bf16, strided inputs (the halves of ``gate_up`` are read in place).
The output is a new contiguous tensor in ``result_type(gate, up)``. Math is float32.

Example:
    >>> import torch
    >>> from policyinject.kernels.activations import gated_act, swiglu
    >>> gu = torch.randn(3, 2, 10)
    >>> torch.allclose(gated_act(gu, "silu", backend="torch"), swiglu(gu[..., :5], gu[..., 5:], backend="torch"))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from policyinject.kernels import reference
from policyinject.kernels._common import (
    as_rows,
    cdiv,
    check_launch,
    device_guard,
    load_kernel_module,
    next_pow2,
    sm_count,
    use_triton,
)

__all__ = ["swiglu", "geglu", "gated_act", "ActConfig", "act_config", "launch_gated_act"]

_ACT_CODE = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


@dataclass(frozen=True)
class ActConfig:
    """Launch parameters: a ``[block_m, block_n]`` tile per program, ``num_warps``."""

    block_m: int
    block_n: int
    num_warps: int = 4


def act_config(m: int, n: int, sms: int = 132) -> ActConfig:
    """Default launch parameters: tiles of about 4096 elements (columns first, up to 2048), 4 warps
    (32 elements, i.e. four 16-byte bf16 loads per input per thread), rows shrunk for small ``m``.

    Example:
        >>> act_config(4096, 14336)
        ActConfig(block_m=2, block_n=2048, num_warps=4)
    """
    block_n = min(next_pow2(n), 2048)
    block_m = min(max(1, 4096 // block_n), next_pow2(max(m, 1)))
    cols = cdiv(n, block_n)
    while block_m > 1 and cdiv(m, block_m) * cols < 4 * sms:
        block_m //= 2
    return ActConfig(block_m=block_m, block_n=block_n, num_warps=4)


def launch_gated_act(
    gate: torch.Tensor, up: torch.Tensor, activation: str, config: Optional[ActConfig] = None
) -> torch.Tensor:
    """Run the Triton kernel: ``act(gate) * up``; ``config=None`` uses :func:`act_config`."""
    act = reference.canonical_activation(activation)
    mod = load_kernel_module("_activations_triton")
    check_launch("gated_act", mod.gated_act_kernel, gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if gate.dim() == 0:
        raise ValueError("gated_act: gate and up need at least one dimension")
    out = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    n = gate.shape[-1]
    if out.numel() == 0:
        return out
    g2, u2 = as_rows(gate), as_rows(up)
    o2 = out.view(-1, n)
    m = g2.shape[0]
    cfg = config or act_config(m, n, sm_count(gate.device))
    grid = (cdiv(m, cfg.block_m), cdiv(n, cfg.block_n))
    with device_guard(gate.device):
        mod.gated_act_kernel[grid](
            g2, u2, o2, m, n, g2.stride(0), u2.stride(0), o2.stride(0),
            ACT=_ACT_CODE[act], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``.

    Example:
        >>> import torch
        >>> swiglu(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), backend="torch")
        tensor([0.0000, 1.4621])
    """
    if not use_triton(backend, gate, up):
        return reference.swiglu(gate, up)
    return launch_gated_act(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *, backend: str = "auto") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` with ``approximate`` ``"tanh"`` (HF ``gelu_pytorch_tanh``) or ``"none"``.

    Example:
        >>> import torch
        >>> geglu(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), "none", backend="torch")
        tensor([0.0000, 0.8413])
    """
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    if not use_triton(backend, gate, up):
        return reference.geglu(gate, up, approximate)
    return launch_gated_act(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


def gated_act(gate_up: torch.Tensor, activation: str = "silu", *, backend: str = "auto") -> torch.Tensor:
    """``act(gate) * up`` on a fused ``[..., 2*I]`` tensor (gate first); returns ``[..., I]``.

    Example:
        >>> import torch
        >>> gated_act(torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "silu", backend="torch")
        tensor([[0.0000, 1.4621]])
    """
    reference.canonical_activation(activation)  # validate early, same error on every backend
    if not use_triton(backend, gate_up):
        return reference.gated_act(gate_up, activation)
    n2 = gate_up.shape[-1]
    if n2 % 2:
        raise ValueError(f"gate_up last dim must be even (gate then up), got {n2}")
    return launch_gated_act(gate_up[..., : n2 // 2], gate_up[..., n2 // 2 :], activation)
