"""init_inference end to end: matching, the dtype pass, the plan, lint, and atomicity on failure."""

from __future__ import annotations

import json

import pytest
import torch

import policyinject as pi
from policyinject.errors import PlanError
from policyinject.policy import AttentionSpec, Policy
from policyinject.testing.presets import tiny_model
from policyinject_example_plugin.modeling import ToyBlock, ToyConfig, ToyForCausalLM
from policyinject_example_plugin.plugin import TOY_BLOCK_POLICY


def snapshot(model: torch.nn.Module) -> dict:
    """Everything that must not change when planning fails."""
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "params": {n: (p.data_ptr(), p.dtype, p.device, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: (b.dtype, b.detach().clone()) for n, b in model.named_buffers()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["modules"] == after["modules"]
    assert before["params"].keys() == after["params"].keys()
    for name, (ptr, dtype, device, value) in before["params"].items():
        ptr2, dtype2, device2, value2 = after["params"][name]
        assert (ptr, dtype, device) == (ptr2, dtype2, device2), name
        assert torch.equal(value, value2), name
    for name, (dtype, value) in before["buffers"].items():
        assert after["buffers"][name][0] == dtype and torch.equal(value, after["buffers"][name][1]), name


def test_dtype_pass_casts_and_engine_runs():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 6))
    engine = pi.init_inference(model, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert engine.module is model
    logits = engine(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert engine.plan.actions[0].details == {"from": "fp32", "to": "bf16"}


def test_auto_dtype_keeps_fp32_on_cpu_and_generate_delegates():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    engine = pi.init_inference(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = engine.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)


def test_builtin_policies_match_every_layer_of_each_family():
    model = tiny_model("llama")
    plan = pi.plan_inference(model, pi.load_config({"dtype": "fp32"}))
    assert [m.path for m in plan.layers] == ["model.layers.0", "model.layers.1"]
    assert all(m.policy.source == "plugin llama" for m in plan.layers)
    assert plan.model_policy is not None and plan.model_policy.layers == "model.layers"


def test_user_policy_in_code_beats_plugins_and_shows_its_source():
    model = ToyForCausalLM(ToyConfig())
    plan = pi.plan_inference(model, pi.load_config({"injection_policy": {ToyBlock: TOY_BLOCK_POLICY}}))
    assert {m.policy.source for m in plan.layers} == {"injection_policy"}
    plan = pi.plan_inference(model, pi.load_config({}))
    assert {m.policy.source for m in plan.layers} == {"plugin policyinject-example-plugin:toy"}


def test_deepspeed_tuple_form_becomes_a_policy():
    model = ToyForCausalLM(ToyConfig())
    cfg = pi.load_config({"injection_policy": {ToyBlock: ("attn.out_proj", "mlp.fc2")}})
    plan = pi.plan_inference(model, cfg)
    styles, unmatched, uncovered = plan.layers[0].policy.styles_for(plan.layers[0].module)
    assert {k: v.value for k, v in styles.items()} == {
        "attn.q_proj": "column", "attn.k_proj": "column", "attn.v_proj": "column", "attn.out_proj": "row",
        "mlp.fc1": "column", "mlp.fc2": "row",
    }
    assert unmatched == [] and uncovered == []


def test_qualified_name_matching():
    model = ToyForCausalLM(ToyConfig())
    policy = Policy("policyinject_example_plugin.modeling.ToyBlock", styles={"attn.out_proj": "row"})
    plan = pi.plan_inference(model, pi.load_config({"injection_policy": {ToyBlock: policy}}))
    assert len(plan.layers) == ToyConfig().num_hidden_layers


def test_lint_reports_uncovered_layer_classes_and_unmatched_rules():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Other(), Other()])

    policy = Policy(Other, styles={"nothing_here": "row"})
    plan = pi.plan_inference(Net(), pi.load_config({}))
    assert "no policy covers layer class Other (2 instances)" in plan.lint
    # A plugin's rule that names nothing is lint; the same rule given by the user is a PolicyError
    # (tests/core/test_policy_input.py).
    class Plugin:
        @pi.hookimpl
        def policyinject_register_policies(self, register):
            register(policy)

    pm = pi.PluginManager.empty()
    pm.register(Plugin, name="other")
    plan = pi.plan_inference(Net(), pi.load_config({}), plugins=pm)
    assert any("'nothing_here' matched no submodule" in m for m in plan.lint)
    assert any("linear 'lin' is covered by no rule" in m for m in plan.lint)


def test_plan_prints_and_serialises():
    model = tiny_model("llama")
    engine = pi.init_inference(model, dtype="fp16")
    table = str(engine.plan)
    assert "dtype" in table and "fp16" in table
    data = json.loads(engine.plan.dumps())
    assert data["actions"][0]["pass"] == "dtype"
    assert engine.report["parameter_bytes"] == sum(p.numel() * 2 for p in model.parameters())


def test_failed_plan_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = snapshot(model)
    bad = Policy(
        "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
        attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="no_such_proj", o="o_proj"),
    )
    with pytest.raises(pi.PolicyError) as info:  # a path that names nothing: PolicyError at plan time
        pi.init_inference(model, dtype="bf16", replace_with_kernel_inject=True,
                          injection_policy={type(model.model.layers[0]): bad})
    assert "no_such_proj" in str(info.value)
    assert_same(before, snapshot(model))
