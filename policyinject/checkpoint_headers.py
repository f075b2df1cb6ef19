"""A checkpoint checked against the model from its safetensors headers alone, before anything changes.

Used by :func:`policyinject.checkpoint.plan_checkpoint`: every tensor apply will read exists, with the model's
shape, and floating-point data for floating-point tensors; names the model does not use are reported apart.

Example:
    >>> import torch
    >>> check_checkpoint(torch.nn.Linear(3, 2), {"weight": ("F32", (2, 3)), "bias": ("F32", (2,))})
    ([], [])
"""

from __future__ import annotations

import json
from typing import Iterable, List, Mapping, Optional, Tuple, Dict

import torch
from torch import nn

from .errors import PlanError

__all__ = ["read_header", "check_checkpoint"]


_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}


def read_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype code, shape) from a file's header, reading no tensor data.

    Example:
        >>> import os, tempfile
        >>> from safetensors.torch import save_file
        >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors"); save_file({"w": torch.zeros(2, 3)}, f)
        >>> read_header(f)
        {'w': ('F32', (2, 3))}
    """
    import struct

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PlanError(f"checkpoint file {path!r} is not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise PlanError(f"checkpoint file {path!r}: header of {n} bytes; not a safetensors file")
        try:
            meta = json.loads(f.read(n))
        except ValueError as exc:
            raise PlanError(f"checkpoint file {path!r}: unreadable safetensors header ({exc})") from None
    meta.pop("__metadata__", None)
    return {k: (str(v.get("dtype")), tuple(int(x) for x in v.get("shape", ()))) for k, v in meta.items()}


def check_checkpoint(model: nn.Module, headers: Mapping[str, Tuple[str, Tuple[int, ...]]], required: Iterable[str] = (),
                     sharded: Iterable[str] = (), aliases: Optional[Mapping[str, str]] = None) -> Tuple[List[str], List[str]]:
    """Problems (missing tensors, wrong shapes, integer data for float tensors) and unexpected names.

    A tensor is needed when apply reads it: a ``required`` name (a tensor-parallel shard), or any tensor still
    on the meta device (a meta buffer the checkpoint lacks is fine when it can be recomputed from its module's
    ``config``). Tensors present are checked against the model's shape, except ``sharded`` ones (pre-sharded).

    Example:
        >>> m = torch.nn.Linear(3, 2)
        >>> check_checkpoint(m, {"weight": ("F32", (2, 4)), "extra": ("F32", (1,))}, required=["bias"])
        (['weight: shape (2, 4) in the checkpoint, the model expects (2, 3)', 'missing 1 tensors the model needs: bias'], ['extra'])
    """
    from .checkpoint import _aliases, _recompute_buffer

    alias = {**_aliases(model), **dict(aliases or {})}
    required, sharded = set(required), set(sharded)
    problems: List[str] = []
    missing: List[str] = []
    known = set()

    def lookup(name: str) -> Optional[str]:
        if name in headers:
            return name
        other = alias.get(name)
        return other if other in headers else None

    tensors = list(model.state_dict(keep_vars=True).items())
    for mpath, mod in model.named_modules():
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):
            b = mod._buffers.get(bname)
            if b is not None:
                tensors.append((f"{mpath}.{bname}" if mpath else bname, b))
    for name, t in tensors:
        if t is None:
            continue
        known.add(name)
        key = lookup(name)
        if key is not None:
            known.add(key)
            code, shape = headers[key]
            if key not in sharded and shape != tuple(t.shape):
                problems.append(f"{name}: shape {shape} in the checkpoint, the model expects {tuple(t.shape)}")
            if t.is_floating_point() and code not in _FLOAT_CODES and not code.startswith("F8"):
                problems.append(f"{name}: stored as {code}, the model's tensor is {t.dtype} (a quantized "
                                "checkpoint? use quant.checkpoint for policyinject's own)")
            continue
        if name in required:
            missing.append(name)
        elif t.device.type == "meta":
            owner, _, bname = name.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            if bname in mod._buffers and _recompute_buffer(mod, bname) is not None:
                continue
            missing.append(name)
    if missing:
        problems.append(f"missing {len(missing)} tensors the model needs: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    unexpected = sorted(k for k in headers if k not in known)
    return problems, unexpected
