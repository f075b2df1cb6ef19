"""The docstring examples of the config package and its CLI command run and pass."""

import doctest
import importlib

import pytest

MODULES = [
    "policyinject.config", "policyinject.config.errors", "policyinject.config.dtypes", "policyinject.config.tp_plan",
    "policyinject.config.values", "policyinject.config.keys", "policyinject.config.model",
    "policyinject.config.checks", "policyinject.config.converter", "policyinject.config.normalize",
    "policyinject.config.loader", "policyinject.config.schema", "policyinject.config.doc_table",
    "policyinject.config.inputs", "policyinject.config.files", "policyinject.config.class_ref",
    "policyinject.config.fingerprint", "policyinject.cli.config_cmd",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "policyinject.config":
        assert result.attempted > 0, f"{name} has no examples"
