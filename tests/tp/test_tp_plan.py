"""Tensor-parallel planning in one process (no process group needed), short forms, and the modules' contracts."""

from __future__ import annotations

import pytest
import torch

from policyinject.config import load_config
from policyinject.distributed import TPInfo, resolve_tp, tp_group_ranks
from policyinject.errors import PlanError, PolicyError, UnsupportedError
from policyinject.modules.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from policyinject.pipeline import init_inference, prepare
from policyinject.policy.autotp import heuristic_policy
from policyinject.plan_fields import LocalHeads
from policyinject._plugin_manager import PluginManager
from policyinject.policy import Style
from policyinject.policy.shortforms import convert_hf_plan, from_deepspeed, hf_style
from policyinject.testing.presets import preset_model, tiny_model


def _plan(model, plugins=None, **tp):
    cfg = load_config(None, dtype="fp32", tensor_parallel={"tp_size": 2, **tp})
    planned = prepare(model, cfg, plugins)
    return planned.plan, planned.context


def test_plan_shows_every_linear_with_shapes_and_rows():
    model = preset_model("smollm2-135m", dtype=torch.float32, device="meta", num_hidden_layers=1)
    plan, ctx = _plan(model)
    acts = {a.path: a for a in plan.for_pass("tensor_parallel")}
    q = acts["model.layers.0.self_attn.q_proj"]
    assert q.action == "column" and q.details["global"] == [576, 576] and q.details["local"] == [384, 576]
    assert q.details["split"].startswith("q heads 0:6 of 9")
    k = acts["model.layers.0.self_attn.k_proj"]
    assert k.details["local"] == [128, 576] and "kv heads 0:2 of 3" in k.details["split"]
    o = acts["model.layers.0.self_attn.o_proj"]
    assert o.action == "row" and o.details["local"] == [576, 384]
    assert acts["model.layers.0.mlp.down_proj"].details["local"] == [576, 768]
    assert acts["model.embed_tokens"].action == "vocab_embedding"
    assert acts["lm_head"].action == "vocab_head" and acts["lm_head"].details["tied"] == "model.embed_tokens"
    # planning on rank 0 (no process group here): SmolLM2 at tp=2 gives this rank 2 kv groups = 6 q heads
    assert plan.tensor_parallel.heads["model.layers.0"] == LocalHeads(heads=6, kv_heads=2)
    assert ctx.tp.planning_only
    assert "tensor_parallel" in plan.to_table() and plan.to_json()["actions"]


def test_fused_qkv_rows_follow_layout():
    model = tiny_model("gpt2", n_embd=96, n_head=6)
    plan, _ = _plan(model, tp_size=3)
    c_attn = next(a for a in plan.for_pass("tensor_parallel") if a.path == "transformer.h.0.attn.c_attn")
    # blocks layout [q | k | v], 16-wide heads: rank 0 keeps q heads 0-1, k heads 0-1, v heads 0-1
    assert c_attn.details["rows"] == "0:32,96:128,192:224" and c_attn.details["local"] == [96, 96]


def test_invalid_split_is_a_plan_error_and_model_untouched():
    model = tiny_model("llama")
    before = [(n, type(m)) for n, m in model.named_modules()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(PlanError) as err:
        init_inference(model, dtype="fp32", tensor_parallel={"tp_size": 3})
    msg = str(err.value)
    assert "model.layers.0" in msg and "tp_size=3" in msg and "valid tp sizes for 4 query / 2 kv heads: 1, 2, 4" in msg
    assert before == [(n, type(m)) for n, m in model.named_modules()]
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_apply_without_process_group_says_how_to_launch():
    with pytest.raises(UnsupportedError, match="torchrun --nproc-per-node 2"):
        init_inference(tiny_model("llama"), dtype="fp32", tensor_parallel={"tp_size": 2})


def test_autotp_uses_hf_plan_then_heuristics_and_refuses_unknown_fused_qkv():
    plan, _ = _plan(tiny_model("llama"), PluginManager.empty())
    by = {a.details.get("by") for a in plan.for_pass("tensor_parallel") if "style" in a.details}
    assert by == {"autotp:hf_plan"}
    plan, _ = _plan(tiny_model("opt"), PluginManager.empty())
    styles = {a.path.rsplit(".", 1)[-1]: a.action for a in plan.for_pass("tensor_parallel")
              if a.path.startswith("model.decoder.layers.0.") and "style" in a.details}
    assert styles == {"q_proj": "column", "k_proj": "column", "v_proj": "column", "out_proj": "row",
                      "fc1": "column", "fc2": "row"}
    with pytest.raises(PlanError, match=r"c_attn looks like a fused QKV projection.*qkv_layout"):
        _plan(tiny_model("gpt2"), PluginManager.empty())


def test_heuristic_refuses_when_no_linear_is_row_parallel():
    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)

    with pytest.raises(PlanError, match=r"layers.3 \(Blk\).*none of its linears"):
        heuristic_policy(Blk(), "layers.3")


def test_deepspeed_short_form():
    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Module()
            self.attention.output = torch.nn.Module()
            self.attention.output.dense = torch.nn.Linear(4, 4)
            self.output = torch.nn.Module()
            self.output.dense = torch.nn.Linear(8, 4)
            self.inter = torch.nn.Linear(4, 8)
            self.mlp_down_proj = torch.nn.Linear(8, 4)

    p = from_deepspeed(Blk, "output.dense", instance=Blk())
    styles, unmatched, uncovered = p.styles_for(Blk())
    assert {k: v.value for k, v in styles.items()} == {
        "attention.output.dense": "row", "output.dense": "row", "mlp_down_proj": "row", "inter": "column"}
    assert unmatched == [] and uncovered == []
    with pytest.raises(PolicyError):
        from_deepspeed(Blk, (1, 2))


def test_hf_plan_conversion_styles_and_moe_lint():
    assert hf_style("colwise_rep") is hf_style("colwise_gather_output") is Style.COLUMN_GATHER
    assert hf_style("rowwise_rep") is Style.ROW_SPLIT_INPUT
    assert hf_style("local_rowwise") is Style.ROW
    with pytest.raises(PolicyError, match="mixture-of-experts"):
        hf_style("grouped_gemm")
    with pytest.raises(PolicyError, match="Hugging Face TP style 'colwize': unknown tensor-parallel style `colwize`; did you mean `colwise`"):
        hf_style("colwize")
    m = tiny_model("mixtral")
    # the experts' entries as transformers 5.24 ships them (5.25 dropped them from Mixtral's plan)
    plan = {**m._tp_plan, "model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
            "model.layers.*.mlp.experts.down_proj": "rowwise", "model.layers.*.mlp.experts": "moe_tp_experts"}
    conv = convert_hf_plan(plan, m)
    assert any("moe_tp_experts" in msg for msg in conv.lint)
    assert conv.model_policies[0].embed == "model.embed_tokens"
    assert conv.policies[0].styles["self_attn.o_proj"] is Style.ROW


def test_modules_contracts_single_process():
    torch.manual_seed(0)
    full = torch.nn.Linear(6, 10)
    x = torch.randn(2, 6)
    a = ColumnParallelLinear.from_linear(full, range(0, 4))
    b = ColumnParallelLinear.from_linear(full, range(4, 10))
    fused = ColumnParallelLinear.cat([a, b])
    assert fused.out_features == 10 and torch.allclose(fused(x), full(x), atol=1e-6)
    row = RowParallelLinear.from_linear(torch.nn.Linear(6, 3), range(6))
    assert row.local.bias is None and row.bias is not None
    with pytest.raises(ValueError, match="no bias"):
        RowParallelLinear(torch.nn.Linear(2, 2))

    class Doubled(torch.nn.Module):  # stands for a quantized linear: the parallel module only adds communication
        def __init__(self, lin):
            super().__init__()
            self.lin, self.in_features, self.out_features = lin, lin.in_features, lin.out_features

        def forward(self, x):
            return 2 * self.lin(x)

    a.local = Doubled(a.local)
    assert torch.allclose(a(x), 2 * full(x)[:, :4], atol=1e-6)


def test_group_helpers():
    assert tp_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(PlanError, match="tp_size=3 does not divide the world size 4"):
        tp_group_ranks(4, 3)
    assert resolve_tp(1) == TPInfo(rank=0, world_size=1)


def test_one_style_table_config_accepts_exactly_what_the_planner_converts():
    """Every style name ``tensor_parallel.tp_plan`` validation accepts converts in the planner (a Style, or a
    mixture-of-experts style dropped with a lint); every name it refuses, the planner refuses too."""
    from policyinject.config import ConfigError
    from policyinject.config.tp_plan import HF_STYLE_TABLE, HF_TP_STYLES, HF_UNSUPPORTED_STYLES, MOE
    from policyinject.policy.shortforms import HF_MOE_STYLES

    assert HF_TP_STYLES == tuple(HF_STYLE_TABLE)
    for name in HF_TP_STYLES:
        load_config(None, tensor_parallel={"tp_plan": {"layers.*.mlp.up_proj": name}})
        if HF_STYLE_TABLE[name] == MOE:
            assert name in HF_MOE_STYLES
            with pytest.raises(PolicyError, match="mixture-of-experts"):
                hf_style(name)
        else:
            assert isinstance(hf_style(name), Style)
    for name in list(HF_UNSUPPORTED_STYLES) + ["colwize"]:
        with pytest.raises(ConfigError, match=f"`{name}`"):
            load_config(None, tensor_parallel={"tp_plan": {"layers.*.mlp.up_proj": name}})
        with pytest.raises(PolicyError, match=f"'{name}'"):
            hf_style(name)
