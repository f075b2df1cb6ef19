"""``QuantLinear``: an ``nn.Linear`` replacement holding int8 or packed int4 weights (weight-only quantization).

Keeps the ``nn.Linear`` call contract (``y = module(x)``, any leading dims, ``in_features``/``out_features``)
and runs :func:`policyinject.kernels.quant_matmul.quant_matmul` (Triton on CUDA, the dequantize-then-matmul
reference elsewhere, chosen by ``backend``). The quantized weight, scales and zero points are buffers, so
``state_dict``/``.to(device)`` work; the bias keeps its 16-bit dtype.

Helpers for the other passes: :meth:`QuantLinear.cat` concatenates output features (kernel injection fuses
q/k/v and gate/up), :meth:`narrow_out` / :meth:`narrow_in` cut a tensor-parallel shard of rows / columns
together with their scales (column cuts must align with the quantization groups).

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(64, 16)
    >>> q = QuantLinear.from_linear(lin, num_bits=4, group_size=32, backend="torch")
    >>> q
    QuantLinear(in_features=64, out_features=16, bias=True, bits=4, group_size=32, symmetric=True, backend=torch)
    >>> x = torch.randn(2, 3, 64)
    >>> float((q(x) - lin(x)).norm() / lin(x).norm()) < 0.1
    True
    >>> q.weight_bytes()  # 16 x 64 nibbles + 16 x 2 fp16 scales
    576
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..kernels.quant_matmul import quant_gated_matmul, quant_matmul
from ..kernels.quantize import QuantizedWeight, quantize_weight

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer (see the module docstring)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        *,
        num_bits: int,
        in_features: int,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        out_features = qweight.shape[0]
        if scales.dim() != 2 or scales.shape[0] != out_features or in_features % scales.shape[1] != 0:
            raise ValueError(
                f"scales {tuple(scales.shape)} do not fit a [{out_features}, {in_features}] weight in groups"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.num_bits = int(num_bits)
        self.group_size = self.in_features // scales.shape[1]
        self.backend = backend
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.bias = bias

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, backend: str = "auto") -> "QuantLinear":
        """Wrap a :class:`~policyinject.kernels.quantize.QuantizedWeight`."""
        return cls(qw.qweight, qw.scales, qw.zeros, bias, num_bits=qw.num_bits, in_features=qw.in_features,
                   backend=backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        num_bits: int = 8,
        group_size: Optional[int] = None,
        symmetric: bool = True,
        backend: str = "auto",
        *,
        q_groups: Optional[int] = None,
        transposed: bool = False,
        scale_dtype: torch.dtype = torch.float16,
    ) -> "QuantLinear":
        """Quantize a linear-like module's ``weight`` (``[out, in]``; ``[in, out]`` with ``transposed=True``, as
        GPT-2's ``Conv1D``). ``group_size``/``q_groups``: see
        :func:`~policyinject.kernels.quantize.resolve_group_size` (neither: the default for ``num_bits``).

        Example:
            >>> QuantLinear.from_linear(torch.nn.Linear(576, 8, bias=False), 4).group_size
            32
        """
        weight = linear.weight.detach()
        if transposed:
            weight = weight.t()
        qw = quantize_weight(weight, num_bits, group_size, symmetric, q_groups=q_groups, scale_dtype=scale_dtype)
        bias = getattr(linear, "bias", None)
        return cls.from_quantized(qw, None if bias is None else bias.detach().clone(), backend)

    # --- the nn.Linear contract ---------------------------------------------------------------------------

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def quantized_weight(self) -> QuantizedWeight:
        """The stored tensors as a :class:`~policyinject.kernels.quantize.QuantizedWeight` (no copy)."""
        return QuantizedWeight(
            qweight=self.qweight, scales=self.scales, zeros=self.zeros, num_bits=self.num_bits,
            group_size=self.group_size, in_features=self.in_features, out_features=self.out_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.quantized_weight(), self._bias_like(x), backend=self.backend)

    def _bias_like(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bias in ``x``'s dtype (None without one)."""
        bias = self.bias
        return bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias

    def gated(self, x: torch.Tensor, activation: str) -> Optional[torch.Tensor]:
        """``act(gate) * up`` for this layer as a fused gate|up projection, in one kernel where one applies
        (int8 per channel, or int4 with bf16; one row on a GPU; SwiGLU:
        :func:`~policyinject.kernels.quant_matmul.quant_gated_matmul`),
        else None (the caller runs the layer, then the activation).

        Example:
            >>> q = QuantLinear.from_linear(nn.Linear(64, 32), num_bits=4)
            >>> q.gated(torch.randn(1, 64), "silu") is None  # on the CPU: no fused kernel
            True
        """
        if self.backend == "torch":
            return None
        return quant_gated_matmul(x, self.quantized_weight(), activation, self._bias_like(x))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # model.to(dtype) / .half() cast floating buffers; the scales and zero points keep their own dtype
        # (fp16 by default: bf16 scales would cost accuracy), only their device follows.
        dtypes = (self.scales.dtype, None if self.zeros is None else self.zeros.dtype)
        super()._apply(fn, recurse)
        if self.scales.dtype != dtypes[0]:
            self.scales = self.scales.to(dtypes[0])
        if self.zeros is not None and self.zeros.dtype != dtypes[1]:
            self.zeros = self.zeros.to(dtypes[1])
        return self

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight, its scales and zero points (the bias is not counted)."""
        return self.quantized_weight().nbytes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.num_bits}, group_size={self.group_size}, symmetric={self.symmetric}, backend={self.backend}"
        )

    # --- reshaping for fusion and tensor parallelism ------------------------------------------------------

    @classmethod
    def cat(cls, modules: Sequence["QuantLinear"]) -> "QuantLinear":
        """Concatenate output features (q|k|v, gate|up). All must share in_features, bits, group size and
        symmetry; a missing bias counts as zeros when another piece has one.

        Example:
            >>> a = QuantLinear.from_linear(torch.nn.Linear(32, 4), 8)
            >>> b = QuantLinear.from_linear(torch.nn.Linear(32, 6, bias=False), 8)
            >>> ab = QuantLinear.cat([a, b])
            >>> ab.out_features, ab.bias.shape
            (10, torch.Size([10]))
        """
        modules = list(modules)
        if not modules:
            raise ValueError("QuantLinear.cat needs at least one module")
        first = modules[0]
        for m in modules[1:]:
            if not isinstance(m, QuantLinear):
                raise TypeError(f"QuantLinear.cat cannot concatenate {type(m).__name__}")
            same = (m.in_features, m.num_bits, m.group_size, m.symmetric)
            want = (first.in_features, first.num_bits, first.group_size, first.symmetric)
            if same != want:
                raise ValueError(
                    "QuantLinear.cat needs equal (in_features, bits, group_size, symmetric): "
                    f"{want} vs {same}"
                )
        zeros = None if first.symmetric else torch.cat([m.zeros for m in modules], 0)
        bias = None
        if any(m.bias is not None for m in modules):
            ref = next(m.bias for m in modules if m.bias is not None)
            bias = torch.cat([
                m.bias.detach() if m.bias is not None else ref.new_zeros(m.out_features) for m in modules
            ])
        return cls(
            torch.cat([m.qweight for m in modules], 0), torch.cat([m.scales for m in modules], 0), zeros, bias,
            num_bits=first.num_bits, in_features=first.in_features, backend=first.backend,
        )

    def narrow_out(self, start: int, length: int) -> "QuantLinear":
        """Output rows ``start:start+length`` with their scales, zeros and bias (a column-parallel shard).

        Example:
            >>> q = QuantLinear.from_linear(torch.nn.Linear(32, 8), 8)
            >>> q.narrow_out(2, 4).out_features
            4
        """
        if start < 0 or length <= 0 or start + length > self.out_features:
            raise ValueError(f"narrow_out({start}, {length}) is outside out_features={self.out_features}")
        sl = slice(start, start + length)
        zeros = None if self.zeros is None else self.zeros[sl].clone()
        bias = None if self.bias is None else self.bias.detach()[sl].clone()
        return QuantLinear(self.qweight[sl].clone(), self.scales[sl].clone(), zeros, bias,
                           num_bits=self.num_bits, in_features=self.in_features, backend=self.backend)

    def narrow_in(self, start: int, length: int, keep_bias: bool = True) -> "QuantLinear":
        """Input columns ``start:start+length`` (a row-parallel shard). Grouped weights need ``start`` and
        ``length`` to be multiples of the group size; a per-output-channel weight keeps its row scales (int4: even
        ``start``/``length``). A row-parallel wrapper adds the bias once after its reduce: pass
        ``keep_bias=False`` to drop it here.

        Example:
            >>> q = QuantLinear.from_linear(torch.nn.Linear(128, 8), 4, group_size=32)
            >>> q.narrow_in(64, 64).in_features
            64
            >>> q.narrow_in(16, 64)
            Traceback (most recent call last):
            ...
            ValueError: narrow_in(16, 64): in_features split must align with group_size=32 (in_features=128)
        """
        if start < 0 or length <= 0 or start + length > self.in_features:
            raise ValueError(f"narrow_in({start}, {length}) is outside in_features={self.in_features}")
        per_channel = self.group_size == self.in_features
        if per_channel:
            if self.num_bits == 4 and (start % 2 or length % 2):
                raise ValueError(f"narrow_in({start}, {length}): int4 splits need even start and length")
            scales, zeros = self.scales.clone(), None if self.zeros is None else self.zeros.clone()
        else:
            g = self.group_size
            if start % g or length % g:
                raise ValueError(
                    f"narrow_in({start}, {length}): in_features split must align with group_size={g} "
                    f"(in_features={self.in_features})"
                )
            gs = slice(start // g, (start + length) // g)
            scales = self.scales[:, gs].clone()
            zeros = None if self.zeros is None else self.zeros[:, gs].clone()
        per_byte = 1 if self.num_bits == 8 else 2
        qweight = self.qweight[:, start // per_byte:(start + length) // per_byte].clone()
        bias = None if (self.bias is None or not keep_bias) else self.bias.detach().clone()
        return QuantLinear(qweight, scales, zeros, bias, num_bits=self.num_bits, in_features=length,
                           backend=self.backend)
