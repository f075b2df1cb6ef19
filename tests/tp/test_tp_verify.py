"""AutoTP verification: guessed plans are proved on one process before any rank applies them (fast, CPU)."""

from __future__ import annotations

import pytest
import torch

import policyinject as pi
from policyinject import PluginManager
from policyinject.errors import PlanError
from policyinject.passes.tp_verify import capture_inputs, verify_layer
from policyinject.policy import Policy
from policyinject.policy.autotp import hf_plan_policies
from policyinject.testing.coverage import tiny_causal_lm

TP2 = {"tp_size": 2, "tp_grain_size": 8}


class HeadsBlock(torch.nn.Module):
    """A custom block: 4 heads of 16 in a fused qkv, the head count in an attribute no planner knows."""

    def __init__(self) -> None:
        super().__init__()
        self.heads, self.hd = 4, 16
        self.qkv = torch.nn.Linear(64, 192)
        self.out_proj = torch.nn.Linear(64, 64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.hd).unbind(2)
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.hd))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 64)
        self.layers = torch.nn.ModuleList([HeadsBlock(), HeadsBlock()])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tp", [2, 3])
def test_deepspeed_short_form_custom_block_refused_at_plan_time(tp):
    model = Toy()
    before = _state(model)
    with pytest.raises(PlanError) as err:
        pi.init_inference(model, dtype="fp32", plugins=PluginManager.empty(),
                          tensor_parallel={"tp_size": tp, "tp_grain_size": 8},
                          injection_policy={HeadsBlock: ("out_proj", "fc2")})
    text = str(err.value)
    assert "AutoTP verification refused the plan for HeadsBlock (layers.0, from injection_policy)" in text
    assert "heads=4" in text and "Write a Policy for HeadsBlock" in text
    assert all(isinstance(m, torch.nn.Linear) for m in model.layers[0].children())  # nothing applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_short_form_that_is_right_is_accepted():
    class MLPBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__(); self.fc1 = torch.nn.Linear(64, 128); self.fc2 = torch.nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    v = verify_layer(MLPBlock(), Policy(MLPBlock, styles={"fc2": "row"}, default_style="column"), None, 3, 8)
    assert v.problems == [] and v.collectives == 1 and v.max_rel_err <= 1e-5


def test_packed_linear_is_corrected_for_heuristics_and_refused_otherwise():
    model = tiny_causal_lm("modernbert-decoder")
    plan = pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    wi = [a for a in plan.for_pass("tensor_parallel") if a.path.endswith("layers.0.mlp.Wi")][0]
    assert wi.details["style"] == "packed_column" and wi.details["split"].startswith("packed")
    layer = model.model.layers[0]
    plain = Policy(type(layer), styles={"mlp.Wo": "row", "attn.Wo": "row"}, default_style="column")
    inputs = capture_inputs(model, [layer])[id(layer)]
    v = verify_layer(layer, plain, model.config, 2, 8, inputs, correct=False)
    assert any("mlp.Wi: the forward does chunk into 2 equal parts" in p for p in v.problems)


def test_sub_norm_between_column_and_row_is_named():
    model = tiny_causal_lm("bitnet")
    with pytest.raises(PlanError) as err:
        pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    assert "mlp.ffn_sub_norm.weight" in str(err.value) and "BitNetDecoderLayer" in str(err.value)


def test_correct_hf_plan_is_verified_and_accepted():
    model = tiny_causal_lm("llama")
    plan = pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    assert {m.resolved_by.value for m in plan.layers} == {"autotp:hf_plan"}


def test_unknown_style_in_model_plan_replicates_with_lint():
    model = tiny_causal_lm("llama")
    plan = dict(model._tp_plan)
    plan["model.norm"] = "all_reduce"
    plan["model.layers.*.self_attn.kv_a_proj"] = "mla_kv_a_proj"
    policies, _, lint = hf_plan_policies(model, plan)
    assert len(policies) == 1
    assert any("'model.norm' uses style 'all_reduce'" in m and "stays replicated" in m for m in lint)
    assert any("mla_kv_a_proj" in m for m in lint)


def test_user_tp_plan_typo_is_still_a_config_error():
    from policyinject.config import ConfigError

    with pytest.raises(ConfigError) as err:
        pi.plan_inference(tiny_causal_lm("llama"), tensor_parallel={"tp_size": 2, "tp_plan": {"lm_head": "colwize"}})
    assert "lm_head" in str(err.value) and "colwise" in str(err.value)


def test_expert_only_hf_plan_falls_back_to_heuristics():
    model = tiny_causal_lm("llama")
    model._tp_plan = {"model.layers.*.mlp.experts": "moe_tp_experts"}
    plan = pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    assert {m.resolved_by.value for m in plan.layers} == {"autotp:heuristic"}


def test_per_codebook_heads_stay_replicated():
    import transformers

    cfg = transformers.MusicgenDecoderConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                             vocab_size=64, num_codebooks=2, max_position_embeddings=64)
    model = transformers.MusicgenForCausalLM(cfg).eval()
    plan = pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    assert not any(".lm_heads." in m.path for m in plan.layers)
    assert any(m.path.endswith("layers.0") for m in plan.layers)


def test_meta_model_is_verified_on_a_tiny_twin():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    plan = pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
    assert {m.resolved_by.value for m in plan.layers} == {"autotp:hf_plan"}
    cfg = transformers.BitNetConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256)
    with torch.device("meta"):
        model = transformers.BitNetForCausalLM(cfg)
    with pytest.raises(PlanError, match="ffn_sub_norm"):
        pi.plan_inference(model, dtype="fp32", plugins=PluginManager.empty(), tensor_parallel=TP2)
