"""The ``dtype`` key: DeepSpeed's spellings, our short names, and the ``"auto"`` rule.

The config stores a dtype as a short string (``"auto"``, ``"fp16"``, ``"bf16"``, ``"fp32"``, ``"int8"``)
so that configs compare equal and serialise to JSON. ``int8`` means int8 *weights* with 16-bit activations.

``"auto"`` (the default) resolves per model and device with :func:`resolve_dtype`: a 16-bit model keeps its
dtype; an fp32 model on CUDA goes to bf16 (fp16 where the GPU lacks bf16); on the CPU the model's dtype is
kept. DeepSpeed defaults to fp16, which silently overflows bf16-trained checkpoints and halves nothing on
the CPU, where fp16 matmuls are slow.

Example:
    >>> import torch
    >>> normalize_dtype(torch.float16), normalize_dtype("bfloat"), normalize_dtype("torch.float32")
    ('fp16', 'bf16', 'fp32')
    >>> resolve_dtype("auto", torch.float32, "cuda", bf16_supported=True)
    torch.bfloat16
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Optional, Union

import torch

from .errors import InvalidValue, short_repr

#: Our canonical dtype names, in the order the docs list them.
DTYPE_NAMES = ("auto", "fp16", "bf16", "fp32", "int8")

#: Every accepted string (DeepSpeed's ``DtypeEnum`` values plus ``"auto"``) -> canonical name.
DTYPE_SPELLINGS = MappingProxyType({
    "auto": "auto",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "bfloat": "bf16", "torch.bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "int8": "int8", "torch.int8": "int8",
})

_TORCH = MappingProxyType({
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "int8",
})
_BY_NAME = MappingProxyType({v: k for k, v in _TORCH.items()})


def normalize_dtype(value: Any) -> str:
    """Map a ``torch.dtype`` or any accepted string (case-insensitive) to its canonical short name.

    Raises ``InvalidValue`` (turned into a ``ConfigError`` by the loader) for anything else.

    Example:
        >>> normalize_dtype("Half"), normalize_dtype("auto")
        ('fp16', 'auto')
    """
    if isinstance(value, torch.dtype):
        if value in _TORCH:
            return _TORCH[value]
        raise InvalidValue(f"unsupported dtype {value}; use one of {', '.join(DTYPE_NAMES)}")
    if isinstance(value, str):
        name = DTYPE_SPELLINGS.get(str.__str__(value).strip().lower())
        if name is not None:
            return name
        raise InvalidValue(
            f"unknown dtype {short_repr(value, typed=False)}; use one of {', '.join(DTYPE_NAMES)} "
            "(or a DeepSpeed spelling such as float16, half, bfloat16, float32, torch.int8)"
        )
    raise InvalidValue(f"expected a dtype name or a torch.dtype, got {short_repr(value)}")


def torch_dtype(name: str) -> Optional[torch.dtype]:
    """The ``torch.dtype`` of a canonical name; None for ``"auto"``.

    Example:
        >>> torch_dtype("bf16"), torch_dtype("auto")
        (torch.bfloat16, None)
    """
    return None if name == "auto" else _BY_NAME[name]


def resolve_dtype(
    name: str,
    model_dtype: torch.dtype,
    device: Union[str, torch.device],
    bf16_supported: Optional[bool] = None,
) -> torch.dtype:
    """The dtype the model's floating-point weights and activations run in.

    ``"auto"`` and ``"int8"`` (int8 weights, 16-bit activations) follow the auto rule: keep a 16-bit
    ``model_dtype``; on CUDA turn anything else into bf16, or fp16 when ``bf16_supported`` is False
    (None asks ``torch.cuda.is_bf16_supported()``); elsewhere keep ``model_dtype``.

    Example:
        >>> resolve_dtype("auto", torch.float32, "cpu")
        torch.float32
        >>> resolve_dtype("int8", torch.float32, "cuda:0", bf16_supported=False)
        torch.float16
        >>> resolve_dtype("fp16", torch.float32, "cpu")
        torch.float16
    """
    if name not in ("auto", "int8"):
        return _BY_NAME[name]
    if model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    if torch.device(device).type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    return model_dtype
