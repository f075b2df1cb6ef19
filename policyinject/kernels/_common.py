"""Shared plumbing of the kernel families: the backend switch, lazy Triton import, launch checks, and the
small integer helpers of the launch heuristics (:func:`next_pow2`, :func:`pow2_divisor`, :func:`cdiv`,
:func:`floor_pow2`, :func:`sm_count`).

Triton is optional. Only the private modules named ``_*_triton`` (and the Gluon module, which guards its own
import) import triton; every other module of ``policyinject.kernels`` imports without it and runs the
plain-PyTorch reference. The ``_*_triton`` modules are imported on first use through
:func:`load_kernel_module` (Python caches them in ``sys.modules``, Triton caches compiled binaries); no
process-wide mutable state, everything else is a pure function of its arguments.

``TRITON_INTERPRET=1`` must be in the environment before the private ``_*_triton`` modules are imported,
i.e. before the first ``backend="triton"`` call (Triton reads it when ``@triton.jit`` runs).

Example:
    >>> import torch
    >>> from policyinject.kernels._common import use_triton
    >>> use_triton("auto", torch.ones(2))        # CPU tensor: the PyTorch reference
    False
    >>> use_triton("torch", torch.ones(2))
    False
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

from policyinject.errors import UnsupportedError

BACKENDS = ("auto", "triton", "torch")
#: Dtypes the Triton kernels accept for their floating-point tensors.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: SM count assumed off-GPU (interpreter); only used by launch heuristics.
DEFAULT_SM_COUNT = 132


def triton_importable() -> bool:
    """Whether the ``triton`` package imports (it is Linux-only; an install that fails to import counts as
    absent, so ``backend="auto"`` falls back to the PyTorch reference instead of failing at launch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(backend: str, *tensors: Optional[torch.Tensor]) -> bool:
    """Decide whether a call runs the Triton kernel (True) or the PyTorch reference (False).

    ``"torch"``: never. ``"triton"``: always (errors surface at launch). ``"auto"``: when the first tensor is
    on CUDA, every tensor has a kernel dtype and triton is installed. The kernels are inference-only: their
    outputs carry no autograd graph (``requires_grad`` inputs are not a reason to fall back, since HF
    parameters require grad by default and forward passes often run without ``no_grad``).
    """
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if backend != "auto":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    if not present or present[0].device.type != "cuda":
        return False
    if any(t.dtype not in KERNEL_DTYPES for t in present):
        return False
    return triton_importable()


def resolve_backend(backend: str, *tensors: Optional[torch.Tensor]) -> str:
    """:func:`use_triton` as the name of the path taken: ``"triton"`` or ``"torch"``.

    Example:
        >>> resolve_backend("auto", torch.zeros(1)), resolve_backend("triton", torch.zeros(1))
        ('torch', 'triton')
    """
    return "triton" if use_triton(backend, *tensors) else "torch"


def load_kernel_module(name: str, package: str = "policyinject.kernels") -> ModuleType:
    """Import ``<package>.<name>`` (a ``_*_triton`` module of ``@triton.jit`` kernels) on first use.

    Without triton this raises :class:`UnsupportedError` naming the module (the caller asked for the Triton
    backend; ``"auto"`` never gets here without triton).
    """
    try:
        return importlib.import_module(f"{package}.{name}")
    except ImportError as e:
        raise UnsupportedError(
            f"backend='triton' needs the triton package to import {package}.{name} ({e}); "
            "use backend='torch' or 'auto'"
        ) from e


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(name: str, kernel: object, *tensors: Optional[torch.Tensor]) -> None:
    """Raise a clear :class:`UnsupportedError` for launches Triton would reject with an obscure message.

    Checks: dtypes are kernel dtypes, all tensors share one device, and that device is CUDA unless the
    kernel runs under the interpreter ("0 active drivers" otherwise).
    """
    present = [t for t in tensors if t is not None]
    for t in present:
        if t.dtype not in KERNEL_DTYPES:
            raise UnsupportedError(
                f"{name}: the Triton kernel supports float32/float16/bfloat16, got {t.dtype}; use backend='torch'"
            )
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")
    if is_interpreted(kernel):
        return
    dev = present[0].device if present else torch.device("cpu")
    if dev.type != "cuda":
        raise UnsupportedError(
            f"{name}: backend='triton' needs CUDA tensors (got {dev}). To run the Triton kernel on the CPU, set "
            "TRITON_INTERPRET=1 in the environment before the first backend='triton' call of the process "
            "(Triton reads it when the kernel module is imported); otherwise use backend='torch' or 'auto'."
        )
    if not torch.cuda.is_available():  # pragma: no cover - CUDA tensor without a usable GPU is unusual
        raise UnsupportedError(f"{name}: backend='triton' needs a CUDA GPU; torch.cuda.is_available() is False")


def triton_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Raise a clear :class:`UnsupportedError` when ``kernel`` cannot run on these tensors (the GEMV-style
    launchers' check; unlike :func:`check_launch` it takes integer weight tensors).

    A jitted kernel runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
    kernel module was imported.
    """
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda and is_interpreted(kernel):
        raise UnsupportedError(
            "this process runs Triton in interpreter mode (TRITON_INTERPRET=1) but the tensors are on CUDA; "
            "unset TRITON_INTERPRET or move the tensors to the CPU"
        )
    if not on_cuda and not is_interpreted(kernel):
        devices = sorted({str(t.device) for t in tensors})
        raise UnsupportedError(
            f"backend='triton' needs CUDA tensors (got {', '.join(devices)}), or TRITON_INTERPRET=1 set before "
            "policyinject's kernels are imported; use backend='torch' or 'auto' on this machine"
        )


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (``DEFAULT_SM_COUNT`` off-GPU); used by launch heuristics only."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1).

    Example:
        >>> next_pow2(4096), next_pow2(4097), next_pow2(1), next_pow2(0)
        (4096, 8192, 1, 1)
    """
    return 1 << max(int(n) - 1, 0).bit_length()


def floor_pow2(n: int) -> int:
    """Largest power of two <= n (n >= 1).

    Example:
        >>> floor_pow2(48), floor_pow2(64), floor_pow2(1)
        (32, 64, 1)
    """
    return 1 << (int(n).bit_length() - 1)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= ``cap`` dividing ``n``.

    Example:
        >>> pow2_divisor(4096, 2048), pow2_divisor(576, 2048), pow2_divisor(96, 64), pow2_divisor(7, 8)
        (2048, 64, 32, 1)
    """
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (a grid's program count).

    Example:
        >>> cdiv(10, 4), cdiv(8, 4)
        (3, 2)
    """
    return -(-a // b)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as ``[rows, last_dim]`` with unit stride in the last dim, copying only when needed."""
    n = x.shape[-1]
    if x.dim() >= 1 and x.stride(-1) == 1:
        try:
            return x.view(-1, n)
        except RuntimeError:
            pass
    return x.reshape(-1, n).contiguous()


class device_guard:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device); no-op otherwise."""

    def __init__(self, device: torch.device) -> None:
        self._ctx = None
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            self._ctx = torch.cuda.device(device)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
