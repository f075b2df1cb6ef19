"""The dtype pass: cast parameters and buffers to the configured dtype.

``dtype="auto"`` keeps a 16-bit model as it is; an fp32 model goes to bf16 on a CUDA device (fp16 where
bf16 is unsupported) and stays fp32 on the CPU. ``dtype=int8`` means int8 *weights* (the quantize pass)
with 16-bit activations: this pass then casts to bf16 on CUDA and keeps the model's float dtype on CPU.
Norms whose policy says ``keep_fp32`` stay fp32.

Example:
    >>> import torch
    >>> resolve_dtype("auto", torch.float32, torch.device("cpu"))
    torch.float32
    >>> resolve_dtype(torch.float16, torch.float32, torch.device("cpu"))
    torch.float16
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from ..plan import Action
from .base import Pass, PassContext

_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}
_FROM_STR = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def dtype_name(dtype: Any) -> str:
    """Short name of a dtype (``bf16``)."""
    return _SHORT.get(dtype, str(dtype))


def _as_dtype(value: Any) -> Any:
    if isinstance(value, torch.dtype) or value in (None, "auto"):
        return value
    return _FROM_STR.get(str(value), value)


def _cuda_half(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_dtype(requested: Any, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The float dtype parameters end up in, for a requested dtype (``"auto"``, a dtype, ``int8``)."""
    requested = _as_dtype(requested)
    if requested in (None, "auto"):
        if model_dtype in (torch.float16, torch.bfloat16):
            return model_dtype
        return _cuda_half(device) if device.type == "cuda" else model_dtype
    if requested is torch.int8:
        if device.type == "cuda":
            return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else _cuda_half(device)
        return model_dtype
    return requested


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (fp32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@attrs.frozen
class Cast:
    """Payload of the dtype pass's model-level action: the dtype parameters are cast to."""

    dtype: torch.dtype


class DtypePass(Pass):
    """Cast the model to the configured dtype, keeping fp32 norms where the policy asks for it."""

    name = "dtype"

    def plan(self, ctx: PassContext) -> list:
        current = model_float_dtype(ctx.model)
        target = resolve_dtype(ctx.config.dtype, current, ctx.device or torch.device("cpu"))
        actions = [Action(self.name, "", type(ctx.model).__name__, "cast" if target != current else "keep",
                          {"from": dtype_name(current), "to": dtype_name(target)}, payload=Cast(target))]
        for layer in ctx.layers:
            for norm in layer.policy.norms:
                if getattr(norm, "keep_fp32", False) and target != torch.float32:
                    path = f"{layer.path}.{norm.path}" if layer.path else norm.path
                    actions.append(Action(self.name, path, layer.policy.layer_name, "keep fp32", {}))
        ctx.plan.dtype = target
        return actions

    def apply(self, ctx: PassContext, actions: list) -> None:
        cast = actions[0]
        target = cast.payload.dtype
        keep = [a.path for a in actions[1:]]
        if cast.action == "cast":
            ctx.model.to(dtype=target)
        for path in keep:
            ctx.module(path).to(dtype=torch.float32)
