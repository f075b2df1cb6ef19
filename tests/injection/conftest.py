"""Helpers of the kernel-injection tests: inject a model through the public pipeline, compare outputs."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from pi_testing import _init_inference, rel_err


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
