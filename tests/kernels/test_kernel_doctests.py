"""Run the docstring examples of the kernel modules and the fused norm modules (CPU, backend="torch")."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "policyinject.kernels.reference",
    "policyinject.kernels._common",
    "policyinject.kernels.norms",
    "policyinject.kernels.rotary",
    "policyinject.kernels.activations",
    "policyinject.kernels.quant_matmul",
    "policyinject.kernels.quant_heuristics",
    "policyinject.kernels._q4mma_gluon",
    "policyinject.modules.norms",
    "policyinject.modules.quant_linear",
    "policyinject.modules.mlp",
    "policyinject.kernels.gemv",
    "policyinject.modules.fast_linear",
    "policyinject.testing.roofline",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    if name in ("policyinject.modules.norms", "policyinject.modules.mlp"):
        pytest.importorskip("transformers")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
