"""Weight-only quantized matmuls: ``y = x @ dequant(W).T (+ bias)`` for int8 (w8a16) and int4 (w4a16) weights.

The weight format is :class:`policyinject.kernels.quantize.QuantizedWeight`. ``backend="torch"`` (and
``"auto"`` off CUDA or without triton) runs the dequantize-then-matmul reference
(:func:`~policyinject.kernels.quant_reference.quant_matmul_reference`); the Triton path picks one of six
kernels by shape (:func:`~policyinject.kernels.quant_heuristics.quant_matmul_config`), all dequantizing in
registers (no dequantized copy of the weight is ever written) and accumulating in float32:

* decode (``M <= 4`` rows): ``q8gemv`` (int8, one scale per output channel), ``q4mma`` (int4 on the tensor
  cores, one bf16 row, Gluon), ``q4gemv`` (int4 on packed int32 words) or the byte GEMV ``gemv``
  (:mod:`._quant_gemv_triton`, :mod:`._q4mma_gluon`);
* batched decode and short prefills: ``gemm``, tiles with ``tl.dot`` (:mod:`._quant_gemm_triton`);
* long prefills (``M >=`` :data:`~policyinject.kernels.quant_heuristics.DEQUANT_MIN_M`): ``dequant``, the one
  exception to "never written": the weight dequantized into a scratch matrix of the activation dtype, then
  cuBLAS (:mod:`._dequant_triton`).

Launchers: :mod:`._quant_launch_triton`. Module layout: ``docs/kernels.md``.

Example:
    >>> import torch
    >>> from policyinject.kernels.quantize import quantize_weight
    >>> x, qw = torch.randn(3, 64), quantize_weight(torch.randn(16, 64), 4, 32)
    >>> quant_matmul(x, qw, backend="torch").shape
    torch.Size([3, 16])
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..errors import UnsupportedError
from ._common import load_kernel_module, resolve_backend, sm_count, triton_importable
from .quant_heuristics import (
    QGEMV_MAX_M, _byte_gemv_config, _q4gemv_config, _q4mma_config, _q8gemv_config, quant_matmul_config,
)
from .quant_reference import quant_matmul_reference
from .quantize import QuantizedWeight

__all__ = ["quant_matmul", "quant_gated_matmul", "quant_matmul_config", "triton_supports", "QGEMV_MAX_M"]


def triton_supports(qw: QuantizedWeight) -> Optional[str]:
    """None when the Triton kernels take this weight, else the reason (a sentence naming the group size).

    They take one scale per output channel (any K), or groups that are a multiple of 32 (16 for int8).

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> triton_supports(quantize_weight(torch.randn(4, 96), 4, 32)) is None
        True
        >>> triton_supports(quantize_weight(torch.randn(4, 96), 4, 24))
        'group_size=24 (in_features=96): the Triton kernels need one scale per output channel or groups that are a multiple of 32; use backend="torch"'
    """
    if qw.per_channel:
        return None
    multiple = 16 if qw.num_bits == 8 else 32
    if qw.group_size % multiple == 0:
        return None
    return (
        f"group_size={qw.group_size} (in_features={qw.in_features}): the Triton kernels need one scale per "
        f"output channel or groups that are a multiple of {multiple}; use backend=\"torch\""
    )


def quant_matmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    config: Optional[Mapping] = None,
) -> torch.Tensor:
    """``x @ dequantize(qw).T + bias`` for ``x`` of shape ``[..., in_features]``, in ``x``'s dtype.

    ``backend``: ``"auto"`` (Triton on CUDA tensors, the reference elsewhere), ``"triton"`` (also on CPU under
    ``TRITON_INTERPRET=1``) or ``"torch"``. ``config`` overrides
    :func:`~policyinject.kernels.quant_heuristics.quant_matmul_config`.

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> qw = quantize_weight(torch.randn(8, 32), 8)
        >>> quant_matmul(torch.randn(2, 5, 32), qw, torch.zeros(8), backend="torch").shape
        torch.Size([2, 5, 8])
    """
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects in_features={qw.in_features}")
    if resolve_backend(backend, x) == "torch":
        return quant_matmul_reference(x, qw, bias)
    reason = triton_supports(qw)
    if reason is not None:
        raise UnsupportedError(reason)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, qw.out_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    launch = load_kernel_module("_quant_launch_triton")
    cfg = dict(config) if config is not None else quant_matmul_config(
        x2.shape[0], qw.out_features, qw.in_features, qw.num_bits, qw.group_size,
        sm_count(x.device), interpret=not x.is_cuda,
    )
    if config is None and cfg.get("kernel") == "q4mma" and launch.q4mma_words(x2, qw) is None:
        # fp16/fp32 activations or a layout the word kernels cannot read: the CUDA-core kernels take it
        cfg = _q4gemv_config(x2.shape[0], qw.out_features, qw.in_features, qw.group_size, sm_count(x.device),
                             False) or _byte_gemv_config(x2.shape[0], qw.out_features, qw.in_features,
                                                         qw.group_size, sm_count(x.device), False)
    if config is None and cfg.get("kernel") == "q4gemv" and x2.dtype == torch.float32:
        # the word kernel's unpacking trades ~8 of float32's 24 bits (relative error ~1e-5): fine for 16-bit
        # activations, not for float32 ones, which take the byte kernel
        cfg = _byte_gemv_config(x2.shape[0], qw.out_features, qw.in_features, qw.group_size,
                                sm_count(x.device), not x.is_cuda)
    y = launch.launch(x2, qw, bias, cfg)
    return y.reshape(*lead, qw.out_features)


def quant_gated_matmul(
    x: torch.Tensor, qw: QuantizedWeight, activation: str, bias: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """``act(gate) * up`` of a fused gate|up quantized projection in one kernel, or None where no fused kernel
    applies (then compute ``gated_act(quant_matmul(x, qw, bias))``).

    One activation row on a CUDA GPU and ``activation`` ``"silu"`` (SwiGLU); int4 through the tensor-core
    GEMV (:mod:`._q4mma_gluon`, bf16, a shape it takes), int8 per output channel through ``q8gemv``. The
    gate and up sums stay float32 into the activation.

    Example:
        >>> from policyinject.kernels.quantize import quantize_weight
        >>> quant_gated_matmul(torch.randn(1, 256), quantize_weight(torch.randn(64, 256), 4, 32), "silu") is None
        True
    """
    if activation != "silu" or qw.out_features % 2 or x.shape[-1] != qw.in_features:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1 or not x2.is_cuda or not triton_importable():
        return None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias = bias.contiguous() if bias is not None else None
    launch = load_kernel_module("_quant_launch_triton")
    if qw.num_bits == 8 and qw.per_channel:
        cfg = _q8gemv_config(qw.out_features, qw.in_features, sm_count(x.device))
        y = launch.launch_q8gemv(x2, qw, bias, dict(cfg, split_k=1), gated=True)
    else:
        words = launch.q4mma_words(x2, qw)
        if words is None:
            return None
        cfg = _q4mma_config(1, qw.out_features, qw.in_features, qw.group_size, False)
        y = launch.launch_q4mma(x2, qw, words, bias, cfg, gated=True)
    return y.reshape(*x.shape[:-1], qw.out_features // 2)
