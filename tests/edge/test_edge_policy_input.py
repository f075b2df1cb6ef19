"""``injection_policy`` input found by the edge-case suite: a user's entry is used, or the user is told (a
``PolicyError``, or a warning) why not, naming the class; a lint line nobody prints is not enough, and it
must not claim the class is absent when it is there."""

from __future__ import annotations

import warnings

import pytest

import policyinject as pi
from policyinject.testing.presets import tiny_model


@pytest.mark.parametrize("extra", [{"tensor_parallel": {"tp_size": 2}}, {"replace_with_kernel_inject": True}])
def test_an_entry_for_a_nested_class_is_applied_or_refused_loudly(extra):
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = pi.plan_inference(model, dtype="fp32", injection_policy={LlamaMLP: "up_proj"}, **extra)
        except pi.PolicyError as exc:
            assert "LlamaMLP" in str(exc)
            return
    rows = {a.path for a in plan.actions if a.action == "row"}
    applied = "model.layers.0.mlp.up_proj" in rows
    told = any("LlamaMLP" in str(w.message) for w in caught)
    assert applied or told
    assert not any("matched no module" in line for line in plan.lint)


@pytest.mark.parametrize("extra", [{"replace_with_kernel_inject": True}, {"tensor_parallel": {"tp_size": 2}}])
def test_the_model_config_key_as_a_mapping_is_read(extra):
    model = tiny_model("llama")
    as_mapping = model.config.to_dict()
    expected = pi.plan_inference(model, dtype="fp32", **extra)
    plan = pi.plan_inference(model, dtype="fp32", args=as_mapping, **extra)
    assert [(a.path, a.action) for a in plan.actions] == [(a.path, a.action) for a in expected.actions]
