"""Helpers of the kernel-injection tests: inject a model through the public pipeline, compare outputs."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch


def _init_inference() -> Callable:
    try:
        from policyinject import init_inference
    except ImportError:  # the package root may not re-export it yet
        from policyinject.pipeline import init_inference
    return init_inference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error by norm; NaN or inf never passes (it returns inf)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def output_tensor(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def inject() -> Callable:
    """``inject(model, **config) -> (original_copy, engine)``: deep-copies the model, then injects in place."""
    init_inference = _init_inference()

    def run(model: torch.nn.Module, **config: Any):
        original = copy.deepcopy(model)
        config.setdefault("replace_with_kernel_inject", True)
        config.setdefault("dtype", "fp32")
        engine = init_inference(model, **config)
        return original, engine

    return run


@pytest.fixture
def compare() -> Callable:
    return rel_err
