"""A third-party plugin for a plain ``nn.Module`` decoder with no model config, used through its entry point:
head counts come from ``(layer, config)`` callables (``config`` is None), literals or the layer's attributes;
kernel injection, tensor parallelism (2 gloo ranks) and int8 quantization give the unconverted model's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from pi_testing import rel_err

import policyinject as pi
from policyinject import PluginManager
from policyinject.errors import PlanError
from policyinject.policy import AttentionSpec, BlockKind, MLPSpec, NormSpec, Policy

from geom_workers import run_ranks

IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))


def _model():
    from policyinject_example_bare.modeling import build_bare

    return build_bare()


def _policy(**attention):
    from policyinject_example_bare.modeling import BareBlock

    return Policy(BareBlock, attention=AttentionSpec(module="attn", q="wq", k="wk", v="wv", o="wo", **attention),
                  mlp=MLPSpec(module="mlp", gate="w1", up="w3", down="w2", activation="silu"),
                  norms=(NormSpec("attn_norm", "rms"), NormSpec("ffn_norm", "rms")),
                  block=BlockKind.PRE_NORM, input_norm="attn_norm", post_attention_norm="ffn_norm")


def test_entry_point_registers_the_bare_policies(bare_plugin):
    infos = {i.name: i for i in PluginManager.default(environ={}).plugins()}
    bare = infos["bare"]
    assert bare.distribution == "policyinject-example-bare" and bare.origin == "third-party"
    assert "layer BareBlock" in bare.registers and "model BareDecoder" in bare.registers


def test_kernel_injection_through_the_entry_point_is_exact(bare_plugin):
    model = _model()
    assert not hasattr(model, "config")
    ref = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True)
    assert {type(b).__name__ for b in model.blocks} == {"InjectedBlock"}
    assert {m.policy.source for m in engine.plan.layers} == {"plugin policyinject-example-bare:bare"}
    info = engine.plan.injection.blocks["blocks.0"]
    assert (info.heads, info.kv_heads, info.head_dim) == (4, 2, 16)
    with torch.inference_mode():
        assert rel_err(engine(IDS), ref(IDS)) <= 1e-5
    # the fast generate path runs (a model policy, no config needed) and matches greedy decoding
    assert engine.plan.decode is not None and engine.plan.decode.supported, engine.plan.decode
    out = engine.generate(IDS, max_new_tokens=5)
    want = IDS
    with torch.inference_mode():
        for _ in range(5):
            want = torch.cat([want, ref(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, want)


@pytest.mark.parametrize("attention", [
    dict(num_heads=4, num_kv_heads=2),  # literals
    dict(num_heads=lambda layer, config: layer.attn.n_heads, num_kv_heads=None, head_dim=16),  # callable + shapes
    dict(),  # the default sources find no config: the attention module's n_heads / n_kv_heads attributes
], ids=["literal", "callable", "attributes"])
def test_each_geometry_source_injects_exactly(bare_plugin, attention):
    from policyinject_example_bare.modeling import BareBlock

    model = _model()
    ref = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, plugins=PluginManager.empty(),
                               injection_policy={BareBlock: _policy(**attention)})
    info = engine.plan.injection.blocks["blocks.1"]
    assert (info.heads, info.kv_heads, info.head_dim) == (4, 2, 16)
    with torch.inference_mode():
        assert rel_err(engine(IDS), ref(IDS)) <= 1e-5


def test_no_geometry_anywhere_is_a_plan_error_naming_the_layer(bare_plugin):
    from policyinject_example_bare.modeling import BareBlock

    model = _model()
    for block in model.blocks:  # hide every head-count attribute
        del block.attn.n_heads, block.attn.n_kv_heads
    with pytest.raises(PlanError, match=r"blocks\.0 \(BareBlock.*no head count.*no model config"):
        pi.plan_inference(model, dtype="fp32", replace_with_kernel_inject=True, plugins=PluginManager.empty(),
                          injection_policy={BareBlock: _policy()})


def test_int8_quantization_through_the_plugin(bare_plugin):
    model = _model()
    ref = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="int8", kernel_backend="torch")
    summary = engine.plan.quantize
    assert summary.linears == 14  # 7 per block; the output head stays
    assert "out" in summary.skipped
    with torch.inference_mode():
        assert rel_err(engine(IDS), ref(IDS)) < 0.02


def test_two_rank_tensor_parallel_is_exact(bare_plugin):
    """One spawn of 2 gloo ranks: TP alone, then TP with kernel injection."""
    results = run_ranks(2, [("bare_tp", dict(tp=2, inject=False)), ("bare_tp", dict(tp=2, inject=True))])
    for rank, per_task in enumerate(results):
        for inject, res in zip((False, True), per_task):
            assert "error" not in res, res.get("error")
            assert res["rel"] <= 1e-5, (rank, inject, res)
            assert res["heads"]["blocks.0"] == {"heads": 2, "kv_heads": 1}
            assert res["sources"] == ["plugin policyinject-example-bare:bare"]
            assert res["layers"] == (["InjectedBlock"] if inject else ["BareBlock"])
