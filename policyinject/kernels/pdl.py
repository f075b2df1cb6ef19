"""Programmatic dependent launch (PDL, sm_90+): whether a launch on a device may use it.

With PDL a kernel may start while the previous kernel in the stream is still finishing. Our decode GEMV
(:mod:`policyinject.kernels.gemv`) is launched that way: it loads its first weight tile (weights never depend
on the previous kernel), then waits (``griddepcontrol.wait``) for the previous kernel's writes before reading
its input or writing anything. The kernels that precede a GEMV in a decode step (norms, gated activations,
decode attention) call ``griddepcontrol.launch_dependents`` first thing, so the GEMV's programs are scheduled
while they run. Both instructions are no-ops when the launch did not ask for PDL.

Example:
    >>> import torch
    >>> pdl_supported(torch.device("cpu"))
    False
"""

from __future__ import annotations

import functools

import torch

__all__ = ["pdl_supported"]


@functools.lru_cache(maxsize=16)
def _cuda_device_supports_pdl(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - a Triton without the NVIDIA backend
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_supported(device: torch.device) -> bool:
    """True on a CUDA device of compute capability 9.0+ with a Triton that knows the ``launch_pdl`` option
    (never for CPU tensors, so never under the interpreter)."""
    if device.type != "cuda":
        return False
    return _cuda_device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())
