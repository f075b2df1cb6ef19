"""Checks run at plan time so that apply rarely fails: device memory and kernel availability.

(The third check, a checkpoint's completeness and shapes, reads the safetensors headers:
:func:`policyinject.checkpoint.check_checkpoint`.)

**Memory.** :func:`estimate_memory` derives from the plan what applying it needs on the target device: the
final footprint (the planned bytes after quantization, else every tensor at the planned float dtype, per
tensor-parallel rank), minus what is already on that device, plus the transient of one layer (apply builds one
layer's replacements -- fused projections, quantized weights, or a linear read from a checkpoint -- before it
frees that layer's originals). :func:`check_memory` compares it with what a *memory probe* reports free and
raises :class:`~policyinject.errors.PlanError` with both numbers. The default probe,
:func:`cuda_free_memory`, asks ``torch.cuda.mem_get_info`` on CUDA devices and reports nothing elsewhere (the
check is then skipped); ``init_inference(..., memory_probe=...)`` takes another one (a scheduler's view of the
device, or a test's).

**Kernels.** :func:`kernel_problems`: ``kernel_backend="triton"`` needs the ``triton`` package, and a CUDA device
unless ``TRITON_INTERPRET=1`` is set.

**Weights.** :func:`weight_problems`, one pass over the weights the plan will change, no copies: a weight the
plan quantizes must be finite (a NaN or an infinity cannot be quantized), and the role linears of a layer the
plan kernel-injects must share one floating dtype when no cast to one dtype is planned (the injected block
computes in one dtype).

Example:
    >>> import torch
    >>> est = MemoryEstimate(final_bytes=10 << 30, resident_bytes=0, transient_bytes=1 << 30)
    >>> est.needed_bytes == 11 << 30
    True
    >>> check_memory(est, lambda device: (4 << 30, 80 << 30), torch.device("cuda", 0))
    Traceback (most recent call last):
    ...
    policyinject.errors.PlanError: device memory: applying this plan needs about 11.00 GiB (final weights 10.00 GiB - 0.00 GiB already there + 1.00 GiB for one layer being built) on cuda:0, but 4.00 GiB of 80.00 GiB are free; lower the footprint (dtype='int8', quant.weight.num_bits=4, tensor_parallel.tp_size) or free device memory
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch

from .errors import PlanError

__all__ = ["MemoryEstimate", "MemoryProbe", "cuda_free_memory", "estimate_memory", "check_memory", "kernel_problems",
           "weight_problems"]

#: ``probe(device) -> (free_bytes, total_bytes)``, or None when it cannot say (the check is skipped).
MemoryProbe = Callable[[torch.device], Optional[Tuple[int, int]]]

GIB = float(1 << 30)


def cuda_free_memory(device: torch.device) -> Optional[Tuple[int, int]]:
    """The default memory probe: ``torch.cuda.mem_get_info`` on a CUDA device, None elsewhere.

    Example:
        >>> cuda_free_memory(torch.device("cpu")) is None
        True
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


@attrs.frozen
class MemoryEstimate:
    """Device bytes applying a plan needs: ``final - resident + transient`` (at least the transient)."""

    final_bytes: int
    resident_bytes: int
    transient_bytes: int

    @property
    def needed_bytes(self) -> int:
        return max(0, self.final_bytes - self.resident_bytes) + self.transient_bytes

    def describe(self) -> str:
        return (f"{self.needed_bytes / GIB:.2f} GiB (final weights {self.final_bytes / GIB:.2f} GiB - "
                f"{self.resident_bytes / GIB:.2f} GiB already there + {self.transient_bytes / GIB:.2f} GiB for one "
                "layer being built)")


def _same_device(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return t.device.index == index


def _tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    seen: set = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _bytes(tensors: List[torch.Tensor], float_size: Optional[int]) -> int:
    return sum(t.numel() * (float_size if (float_size and t.is_floating_point()) else t.element_size())
               for t in tensors)


def estimate_memory(model: torch.nn.Module, plan: Any, layers: List[Any], device: torch.device,
                    tp_size: int = 1) -> MemoryEstimate:
    """What applying ``plan`` to ``model`` needs on ``device`` (see the module docstring).

    Example:
        >>> from policyinject.plan import Plan
        >>> est = estimate_memory(torch.nn.Linear(1024, 1024), Plan(), [], torch.device("cpu"))
        >>> est.final_bytes, est.resident_bytes
        (4198400, 4198400)
    """
    dtype = getattr(plan, "dtype", None)
    float_size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else None
    tensors = _tensors(model)
    tp = max(1, int(tp_size))
    quant = getattr(plan, "quantize", None)
    if quant is not None:
        final = int(quant.model_bytes_after)
    else:
        final = _bytes(tensors, float_size) // tp
    resident = sum(t.numel() * t.element_size() for t in tensors if _same_device(t, device))
    largest = max((_bytes(_tensors(m.module), float_size) for m in layers), default=0) // tp
    return MemoryEstimate(final, resident, largest)


def check_memory(estimate: MemoryEstimate, probe: Optional[MemoryProbe], device: torch.device) -> Optional[str]:
    """Raise :class:`PlanError` when ``probe`` reports less free memory than ``estimate`` needs; else a summary
    line for the plan (None when the probe cannot say)."""
    probe = cuda_free_memory if probe is None else probe
    info = probe(device)
    if info is None:
        return None
    free, total = int(info[0]), int(info[1])
    if estimate.needed_bytes > free:
        raise PlanError(f"device memory: applying this plan needs about {estimate.describe()} on {device}, but "
                        f"{free / GIB:.2f} GiB of {total / GIB:.2f} GiB are free; lower the footprint (dtype='int8', "
                        "quant.weight.num_bits=4, tensor_parallel.tp_size) or free device memory")
    return f"needs {estimate.needed_bytes / GIB:.2f} GiB of {free / GIB:.2f} GiB free"


def kernel_problems(config: Any, device: torch.device, pass_names: List[str]) -> List[str]:
    """Problems with the kernels ``config`` asks for on ``device`` (``kernel_backend='triton'``).

    Example:
        >>> from policyinject.config import load_config
        >>> kernel_problems(load_config(None, kernel_backend="torch"), torch.device("cpu"), ["kernel_inject"])
        []
    """
    backend = str(getattr(config, "kernel_backend", "auto"))
    if backend != "triton" or not {"kernel_inject", "quantize"} & set(pass_names):
        return []
    from .kernels._common import triton_importable

    if not triton_importable():
        return ["kernel_backend='triton': the triton package does not import here; use kernel_backend 'auto' "
                "(Triton where it runs, the PyTorch reference elsewhere) or 'torch'"]
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "") != "1":
        return [f"kernel_backend='triton' on {device}: Triton kernels run on CUDA devices (on the CPU only with "
                "TRITON_INTERPRET=1 in the environment); use kernel_backend 'auto' or 'torch'"]
    return []


def weight_problems(model: torch.nn.Module, config: Any, actions: Sequence[Any], layers: Sequence[Any]) -> List[str]:
    """Problems with the weights the planned ``actions`` will change (see the module docstring).

    A weight read later from a checkpoint (``checkpoint`` or ``quant.checkpoint`` set) or on the meta device is
    not checked here. One ``isfinite`` reduction per quantized weight, one host sync per device.

    Example:
        >>> from policyinject.config import load_config
        >>> from policyinject.plan import Action
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(float("nan"))
        >>> weight_problems(model, load_config(None), [Action("quantize", "0", "Linear", "quantize", {})], [])
        ["0.weight holds NaN or infinite values and cannot be quantized; fix or reload the weights, or leave the linear out (quant.weight.exclude: ['0'])"]
    """
    problems: List[str] = []
    if not config.checkpoint and config.quant.checkpoint is None:
        quantized = [a.path for a in actions if a.pass_name == "quantize" and a.action == "quantize"]
        problems += [f"{path}.weight holds NaN or infinite values and cannot be quantized; fix or reload the "
                     f"weights, or leave the linear out (quant.weight.exclude: [{path!r}])"
                     for path in _non_finite(model, quantized)]
    if not any(a.pass_name == "dtype" and a.action == "cast" for a in actions):
        injected = {a.path for a in actions if a.pass_name == "kernel_inject" and a.action == "replace"}
        problems += [p for layer in layers if layer.path in injected for p in _mixed_dtypes(layer)]
    return problems


def _non_finite(model: torch.nn.Module, paths: Sequence[str]) -> List[str]:
    """The paths (of ``paths``) whose ``weight`` holds a NaN or an infinity; one host sync per device."""
    flags: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or not weight.is_floating_point():
            continue
        flags.setdefault(weight.device, []).append((path, torch.isfinite(weight.detach()).all()))
    bad: List[str] = []
    for found in flags.values():
        ok = torch.stack([f for _, f in found]).tolist()
        bad += [path for (path, _), fine in zip(found, ok) if not fine]
    return sorted(bad, key=list(paths).index)


def _mixed_dtypes(layer: Any) -> List[str]:
    """A problem when the role linears of one kernel-injected layer hold weights of different float dtypes."""
    from .policy.user_input import role_names

    dtypes: Dict[str, torch.dtype] = {}
    for rel in role_names(layer.policy):
        try:
            weight = getattr(layer.module.get_submodule(rel), "weight", None)
        except AttributeError:
            continue
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            dtypes[f"{layer.path}.{rel}.weight" if layer.path else f"{rel}.weight"] = weight.dtype
    kinds = list(dict.fromkeys(dtypes.values()))
    if len(kinds) < 2:
        return []
    common = max(kinds, key=lambda d: sum(v == d for v in dtypes.values()))
    odd = ", ".join(f"{name} {str(d).replace('torch.', '')}" for name, d in dtypes.items() if d != common)
    others, name = sum(v == common for v in dtypes.values()), str(common).replace("torch.", "")
    return [f"{layer.path}: kernel injection computes this layer in one dtype, but its linears' weights differ: "
            f"{odd} (the other {others}: {name}); convert the model to one dtype before init_inference "
            f"(model.to(torch.{name}))"]
