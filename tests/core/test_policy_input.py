"""``injection_policy`` as the user wrote it: short forms merged with the built-in policy of their class, paths
that name nothing refused at plan time, and a warning when kernel injection finds nothing to inject."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import policyinject as pi
from policyinject.config.class_ref import ClassRef
from policyinject.policy import AttentionSpec, MLPSpec, Policy
from policyinject.testing.presets import tiny_model

IDS = torch.tensor([[1, 5, 7, 9, 11, 3]])


def _actions(plan, pass_name):
    return [(a.path, a.action, dict(a.details)) for a in plan.actions if a.pass_name == pass_name]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _same(before, model):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)


# ------------------------------------------------------------------------------------------ short-form merge


@pytest.mark.parametrize("short", [("self_attn.o_proj", "mlp.down_proj"), ("o_proj", "down_proj"),
                                   ("self_attn.o_proj",)])  # the last: down_proj row by DeepSpeed's rule
def test_short_form_keeps_kernel_injection_and_its_logits(short):
    plain = pi.init_inference(tiny_model("llama"), dtype="fp32", replace_with_kernel_inject=True)
    merged = pi.init_inference(tiny_model("llama"), dtype="fp32", replace_with_kernel_inject=True,
                               injection_policy={LlamaDecoderLayer: short})
    injected = [a for a in _actions(merged.plan, "kernel_inject") if a[0].startswith("model.layers.")]
    assert [(p, act) for p, act, _ in injected] == [("model.layers.0", "replace"), ("model.layers.1", "replace")]
    assert type(merged.module.model.layers[0]) is not LlamaDecoderLayer
    layer = merged.plan.layers[0]
    assert layer.resolved_by.value == "injection_policy"
    assert layer.policy.source == "injection_policy (short form) + plugin llama"
    assert layer.policy.attention is not None and layer.policy.mlp is not None
    with torch.no_grad():
        expected, got = plain(IDS).logits, merged(IDS).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_short_form_tensor_parallel_plan_is_the_builtin_split():
    builtin = pi.plan_inference(tiny_model("llama"), tensor_parallel={"tp_size": 2}, replace_with_kernel_inject=True)
    merged = pi.plan_inference(tiny_model("llama"), tensor_parallel={"tp_size": 2}, replace_with_kernel_inject=True,
                               injection_policy={LlamaDecoderLayer: ("self_attn.o_proj", "mlp.down_proj")})
    tp = _actions(merged, "tensor_parallel")
    assert tp == _actions(builtin, "tensor_parallel")
    styles = {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1]: d["style"] for p, _, d in tp if ".layers.0." in p and "style" in d}
    assert styles == {"self_attn.q_proj": "column", "self_attn.k_proj": "column", "self_attn.v_proj": "column",
                      "self_attn.o_proj": "row", "mlp.gate_proj": "column", "mlp.up_proj": "column",
                      "mlp.down_proj": "row"}
    q = next(d for p, _, d in tp if p == "model.layers.0.self_attn.q_proj")
    assert "heads" in q["split"]  # split by heads: the role's geometry, not a plain grain split
    assert _actions(merged, "kernel_inject") == _actions(builtin, "kernel_inject")


@pytest.mark.parametrize("short, linear, said", [
    (("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"), "self_attn.q_proj", "makes it row-parallel"),
    (("mlp.down_proj",), "self_attn.o_proj", "leaves it column-parallel"),
    (("self_attn.o_proj", "up_proj"), "mlp.up_proj", "makes it row-parallel"),
])
def test_short_form_contradicting_the_builtin_roles_is_a_policy_error(short, linear, said):
    model = tiny_model("llama")
    before = _snapshot(model)
    with pytest.raises(pi.PolicyError) as info:
        pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True,
                          injection_policy={LlamaDecoderLayer: short})
    text = str(info.value)
    assert "injection_policy[LlamaDecoderLayer]" in text and "plugin llama" in text
    assert f"'{linear}'" in text and said in text
    _same(before, model)


def test_gpt2_short_form_must_name_both_down_projections():
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    with pytest.raises(pi.PolicyError, match=r"'mlp\.c_proj' is the MLP's down projection"):
        pi.plan_inference(GPT2LMHeadModel(config), tensor_parallel={"tp_size": 2},
                          injection_policy={GPT2Block: ("attn.c_proj",)})
    plan = pi.plan_inference(GPT2LMHeadModel(config), tensor_parallel={"tp_size": 2},
                             injection_policy={GPT2Block: ("attn.c_proj", "mlp.c_proj")})
    assert plan.layers[0].policy.attention.qkv == "c_attn"


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mix = Attn(), Mlp()
        self.extra, self.side = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)


BUILTIN = Policy(Block, attention=AttentionSpec("attn", q="q", k="k", v="v", o="o", num_heads=4, num_kv_heads=4),
                 mlp=MLPSpec("mix", fc1="fc1", fc2="fc2", activation="gelu"), styles={"side": "replicate"})


def _toy_plugins():
    class Toy:
        @pi.hookimpl
        def policyinject_register_policies(self, register):
            register(BUILTIN)

    pm = pi.PluginManager.empty()
    pm.register(Toy, name="toy")
    return pm


def test_short_form_overrides_the_split_where_the_roles_say_nothing():
    model = torch.nn.Sequential(Block(), Block())
    plan = pi.plan_inference(model, plugins=_toy_plugins(), injection_policy={Block: ("attn.o", "fc2", "side")})
    policy = plan.layers[0].policy
    assert policy.attention == BUILTIN.attention and policy.mlp == BUILTIN.mlp
    styles, unmatched, uncovered = policy.styles_for(model[0])
    assert {k: v.value for k, v in styles.items()} == {
        "attn.q": "column", "attn.k": "column", "attn.v": "column", "attn.o": "row", "mix.fc1": "column",
        "mix.fc2": "row", "side": "row",  # named: row, over the plugin's "replicate"
        "extra": "column"}                # covered by nothing: the short form's "every other linear"
    assert unmatched == [] and uncovered == []


# -------------------------------------------------------------------------------- paths that name nothing


@pytest.mark.parametrize("entry, path, closest", [
    (("mix.does_not_exist",), "mix.does_not_exist", "mix.fc1, mix.fc2"),
    (("attn.o", "mix.fc3"), "mix.fc3", "mix.fc2, mix.fc1"),
    (Policy(Block, styles={"mix.does_not_exist": "row"}), "mix.does_not_exist", "mix.fc1, mix.fc2"),
    (Policy(Block, attention=AttentionSpec("attn", q="q", k="k", v="v", o="out")), "attn.out", "attn.o"),
    (Policy(Block, mlp=MLPSpec("mlp", fc1="fc1", fc2="fc2")), "mlp", "mix"),
])
@pytest.mark.parametrize("plugins", ["none", "toy"])
def test_a_path_that_names_nothing_is_a_policy_error(entry, path, closest, plugins):
    model = torch.nn.Sequential(Block(), Block())
    before = _snapshot(model)
    pm = _toy_plugins() if plugins == "toy" else pi.PluginManager.empty()
    with pytest.raises(pi.PolicyError) as info:
        pi.init_inference(model, plugins=pm, dtype="fp32", injection_policy={Block: entry})
    text = str(info.value)
    assert text.startswith("injection_policy[Block]: ")
    assert f"'{path}' names no submodule of Block" in text
    assert f"the closest existing: {closest}" in text
    _same(before, model)


def test_a_path_that_names_nothing_is_refused_for_a_class_written_by_name():
    model = tiny_model("llama")
    name = ClassRef("transformers.models.llama.modeling_llama.LlamaDecoderLayer")
    with pytest.raises(pi.PolicyError, match=r"'self_attn\.o_prj' names no submodule of LlamaDecoderLayer; "
                                             r"the closest existing: self_attn\.o_proj"):
        pi.plan_inference(model, injection_policy={name: ("self_attn.o_prj",)})
    with pytest.raises(pi.PolicyError, match=r"styles key 'mlp\.down' names no submodule"):
        pi.plan_inference(model, injection_policy={LlamaDecoderLayer: Policy(LlamaDecoderLayer,
                                                                              styles={"mlp.down": "row"})})


def test_paths_that_exist_are_accepted_as_before():
    model = torch.nn.Sequential(Block(), Block())
    plan = pi.plan_inference(model, plugins=pi.PluginManager.empty(), injection_policy={Block: ("o", "fc2")})
    styles, _, _ = plan.layers[0].policy.styles_for(model[0])
    assert {k for k, v in styles.items() if v.value == "row"} == {"attn.o", "mix.fc2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pi.plan_inference(model, plugins=pi.PluginManager.empty(), injection_policy={Block: BUILTIN})


@pytest.mark.parametrize("extra", [{"replace_with_kernel_inject": True}, {"tensor_parallel": {"tp_size": 2}}])
def test_an_entry_for_a_class_inside_a_covered_layer_is_a_policy_error(extra):
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = tiny_model("llama")
    before = _snapshot(model)
    with pytest.raises(pi.PolicyError) as err:
        pi.plan_inference(model, dtype="fp32", injection_policy={LlamaMLP: "up_proj"}, **extra)
    text = str(err.value)
    assert "injection_policy[LlamaMLP]" in text and "'model.layers.0.mlp'" in text
    assert "inside 'model.layers.0', a LlamaDecoderLayer" in text and "key the entry by the layer class" in text
    _same(before, model)
    # keyed by the layer class, the same intent is applied
    plan = pi.plan_inference(model, dtype="fp32", injection_policy={LlamaDecoderLayer: ("o_proj", "down_proj")},
                             tensor_parallel={"tp_size": 2})
    assert ("model.layers.1.mlp.down_proj", "row") in {(a.path, a.action) for a in plan.actions}


# ------------------------------------------------------------------------------ nothing to inject: warned


def _nothing_injected(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, **kwargs)
    found = [w for w in caught if issubclass(w.category, pi.NothingInjectedWarning)]
    return engine, found


class Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_kernel_injection_on_a_custom_module_no_policy_matches_warns():
    assert issubclass(pi.NothingInjectedWarning, UserWarning) and "NothingInjectedWarning" in pi.__all__
    engine, found = _nothing_injected(Custom())
    assert len(found) == 1
    text = str(found[0].message)
    assert "nothing will be injected into Custom" in text and "no policy matches any of its layers" in text
    for model_type in ("llama", "gpt2", "mistral"):
        assert model_type in text
    assert "policyinject inspect" in text
    assert found[0].filename == __file__  # points at the caller's line
    assert text in engine.plan.lint
    assert engine(torch.ones(1, 8)).shape == (1, 8)


def test_kernel_injection_on_a_transformers_model_type_without_plugin_warns():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("xglm", d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, vocab_size=256,
                                  max_position_embeddings=64)
    _, found = _nothing_injected(AutoModelForCausalLM.from_config(config))
    assert len(found) == 1
    assert "XGLMForCausalLM (model_type 'xglm')" in str(found[0].message)


def test_matched_layers_that_cannot_be_injected_warn_with_the_reason():
    model = torch.nn.Sequential(Block(), Block())
    _, found = _nothing_injected(model, plugins=pi.PluginManager.empty(), injection_policy={Block: ("o", "fc2")})
    assert len(found) == 1
    text = str(found[0].message)
    assert "2 layers matched (Block) but none can be injected: the policy describes no attention role" in text


def test_no_warning_when_layers_are_injected_or_injection_is_not_asked_for():
    _, found = _nothing_injected(tiny_model("llama"))
    assert found == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", pi.NothingInjectedWarning)
        pi.init_inference(Custom(), dtype="fp32")
