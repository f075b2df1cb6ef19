"""Injected MLP: gate and up projections as one matmul, the gated activation on the fused kernel.

A gated MLP (Llama ``gate_proj``/``up_proj``/``down_proj``, Phi-3 ``gate_up_proj``) runs
``down(act(gate) * up)`` with gate|up concatenated once at injection time and the activation reading the
fused ``[..., 2*I]`` output (:func:`policyinject.kernels.activations.gated_act`). A plain MLP (GPT-2, OPT,
NeoX, Falcon, Phi, BERT: ``fc1``/``fc2``) runs ``fc2(act(fc1(x)))`` with ``Conv1D`` converted to
``nn.Linear``. Decoding one row on a GPU, a gate|up held by a decode GEMV module (16-bit
:class:`~policyinject.modules.fast_linear.DecodeLinear`, int8/int4
:class:`~policyinject.modules.quant_linear.QuantLinear`) runs gate|up and SwiGLU as one kernel (their
``gated`` methods).

Example:
    >>> import torch
    >>> from policyinject.policy import MLPSpec
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gate_proj, self.up_proj = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
    ...         self.down_proj = torch.nn.Linear(8, 4)
    ...     def forward(self, x):
    ...         return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
    >>> m = M()
    >>> inj = InjectedMLP.build(m, MLPSpec(gate="gate_proj", up="up_proj", down="down_proj"), backend="torch")
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(inj(x), m(x), atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import _ops
from .fused_linear import as_linear, fuse_linears
from .fast_linear import DecodeLinear
from .quant_linear import QuantLinear

__all__ = ["InjectedMLP"]


class InjectedMLP(torch.nn.Module):
    """``down(act(gate) * up)`` with a fused gate|up projection, or ``fc2(act(fc1(x)))``."""

    def __init__(self, up: torch.nn.Module, down: torch.nn.Module, activation: str, gated: bool,
                 backend: str = "auto") -> None:
        super().__init__()
        self.up = up
        self.down = down
        self.activation = activation
        self.gated = bool(gated)
        self.backend = backend

    @classmethod
    def build(cls, root: torch.nn.Module, spec: Any, backend: str = "auto") -> "InjectedMLP":
        """Build from ``root`` (the module the spec's paths are relative to: ``spec.module`` resolved)."""
        def get(path: str) -> torch.nn.Module:
            return root.get_submodule(path) if path else root

        act = getattr(spec.activation, "value", spec.activation)
        if spec.gated:
            up = as_linear(get(spec.gate_up)) if spec.gate_up is not None else fuse_linears([get(spec.gate), get(spec.up)])
            return cls(up, as_linear(get(spec.down)), act, True, backend)
        return cls(as_linear(get(spec.fc1)), as_linear(get(spec.fc2)), act, False, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            # a decode GEMV (16-bit, int8, int4) can fold SwiGLU into its epilogue (one row on a GPU)
            fused = self.up.gated(x, self.activation) if isinstance(self.up, (QuantLinear, DecodeLinear)) else None
            h = fused if fused is not None else _ops.gated_act(self.up(x), self.activation, self.backend)
        else:
            h = _ops.activation(self.up(x), self.activation)
        return self.down(h)

    def run_normed(self, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
                   ) -> "Optional[Tuple[torch.Tensor, torch.Tensor]]":
        """``(self(norm(s)), s)`` with ``s = x + residual``, where the gate|up projection folds the residual add,
        the norm and SwiGLU into one decode GEMV (:meth:`DecodeLinear.normed`: one row on a GPU); else None."""
        if not (self.gated and isinstance(self.up, DecodeLinear)):
            return None
        done = self.up.normed(x, residual, norm, self.activation)
        if done is None:
            return None
        h, s = done
        return self.down(h), s

    def extra_repr(self) -> str:
        return f"{'gated ' if self.gated else ''}{self.activation}, backend={self.backend}"
