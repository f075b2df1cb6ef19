"""``init_inference`` / ``plan_inference`` given something that is not a model: a ``TypeError`` naming what was
given (as Python does for a wrong argument type), before the config is used; not an ``AttributeError`` from
deep inside planning."""

from __future__ import annotations

import pytest
import torch

import policyinject as pi


@pytest.mark.parametrize("thing", [None, "gpt2", 3, torch.zeros(3), {"model": 1}])
@pytest.mark.parametrize("entry", ["init_inference", "plan_inference"])
def test_a_non_module_is_a_type_error_naming_it(entry, thing):
    with pytest.raises(TypeError, match=rf"torch\.nn\.Module.*{type(thing).__name__}"):
        getattr(pi, entry)(thing, dtype="fp32")
