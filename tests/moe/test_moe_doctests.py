"""Run the docstring examples of the MoE modules and the MoE plugin data (CPU, backend="torch")."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "policyinject.policy.moe",
    "policyinject.kernels.moe",
    "policyinject.modules.moe",
    "policyinject.modules.moe_parallel",
    "policyinject.passes.moe_inject",
    "policyinject_plugins.mixtral",
    "policyinject_plugins.qwen_moe",
    "policyinject_plugins.olmoe",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    pytest.importorskip("transformers")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
