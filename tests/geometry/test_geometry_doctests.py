"""The docstring examples of the geometry, pattern and quantization-selection modules run and pass."""

import doctest
import importlib

import pytest

MODULES = ["policyinject.policy.geometry", "policyinject.policy.model", "policyinject.config.patterns",
           "policyinject.passes.quant_select", "policyinject.passes.quantize", "policyinject.plan_fields",
           "policyinject.passes.tp_heads", "policyinject.passes.kernel_inject"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", ["policyinject_example_bare.modeling", "policyinject_example_bare.plugin"])
def test_bare_plugin_doctests(bare_plugin, name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
