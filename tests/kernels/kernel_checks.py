"""Helpers shared by the kernel tests: relative error by norm, per-dtype tolerances, NaN-poisoned outputs."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Relative error (by norm) allowed per output dtype. bf16 covers the interpreter's truncating fp32->bf16 cast.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN/inf anywhere in ``out`` gives ``inf``."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(o).all():
        return float("inf")
    denom = r.norm().item()
    num = (o - r).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Shape, dtype and relative error within ``TOL[dtype]`` (NaN never passes)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    tol = TOL[dtype or out.dtype]
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


@contextlib.contextmanager
def poisoned_alloc() -> Iterator[None]:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floating tensors inside the block, so any
    output element a kernel fails to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def poisoned_empty(*args, **kwargs):  # type: ignore[no-untyped-def]
        return fill(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):  # type: ignore[no-untyped-def]
        return fill(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned_empty, poisoned_empty_like  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    """Fresh normal samples (never zeros), created in fp32 and cast."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)
