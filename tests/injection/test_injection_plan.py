"""Planning of the kernel_inject pass: config-dependent wiring, submodule-level fallback, clear errors."""

from __future__ import annotations

import attrs
import pytest
import torch

from policyinject.errors import PlanError
from policyinject.passes.base import PassContext, ResolvedLayer
from policyinject.passes.kernel_inject import KernelInjectPass
from policyinject.testing.presets import tiny_model

from pi_testing import output_tensor, rel_err


def _ids(batch: int = 2, tokens: int = 6) -> torch.Tensor:
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(7))


def _check(model, original, **kwargs) -> None:
    ids = _ids()
    with torch.no_grad():
        err = rel_err(output_tensor(model(ids, **kwargs)), output_tensor(original(ids, **kwargs)))
    assert err < 1e-5, err


def _actions(engine) -> dict:
    return {a.path: a for a in engine.plan.for_pass("kernel_inject")}


@pytest.mark.parametrize("overrides, layout, kind, norms", [
    ({"new_decoder_architecture": True, "num_kv_heads": 2}, "per_kv_group", "parallel", "ln_attn"),
    ({"new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1}, "per_kv_group",
     "parallel", "input_layernorm"),
    ({"multi_query": False}, "per_head", "parallel", "input_layernorm"),
    ({"parallel_attn": False}, "blocks", "pre_norm", "input_layernorm"),
    ({"alibi": True}, "blocks", "parallel", "input_layernorm"),
])
def test_falcon_variants(overrides, layout, kind, norms, inject):
    model = tiny_model("falcon", **overrides)
    original, engine = inject(model, kernel_backend="torch")
    action = _actions(engine)["transformer.h.0"]
    assert action.details["kind"] == kind
    assert layout in action.details["qkv"]
    policies = {m.path: m.policy for m in engine.plan.layers}  # payloads are released after apply
    assert policies["transformer.h.0"].input_norm == norms
    # ALiBi configs take the wiring without rotary, read from the config: transformers >= 5.25 no longer passes
    # `alibi=` to the layer and computes rotary tables for every Falcon
    assert (policies["transformer.h.0"].attention.rotary is None) == bool(overrides.get("alibi"))
    _check(model, original)


def test_neox_sequential_residual_becomes_pre_norm(inject):
    model = tiny_model("gpt_neox", use_parallel_residual=False)
    original, engine = inject(model, kernel_backend="torch")
    assert _actions(engine)["gpt_neox.layers.0"].details["kind"] == "pre_norm"
    _check(model, original)


def test_opt_350m_style_post_norm(inject):
    model = tiny_model("opt", do_layer_norm_before=False)
    original, engine = inject(model, kernel_backend="torch")
    acts = _actions(engine)
    assert acts["model.decoder.layers.0"].details["kind"] == "post_norm"
    assert "model.decoder.final_layer_norm" not in acts  # OPT-350m has no final norm
    _check(model, original)


def test_gpt2_cross_attention_falls_back_to_submodules(inject):
    model = tiny_model("gpt2", add_cross_attention=True)
    original, engine = inject(model, kernel_backend="torch")
    action = _actions(engine)["transformer.h.0"]
    assert action.action == "replace_submodules"
    assert action.details["replace"]["attn"] == "InjectedAttention"
    assert "crossattention" in action.details["reason"]
    enc = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    _check(model, original, encoder_hidden_states=enc)


def test_mixtral_injects_the_moe_block(inject):
    model = tiny_model("mixtral")
    original, engine = inject(model, kernel_backend="torch")
    layer = model.model.layers[0]
    assert type(layer).__name__ == "InjectedBlock"
    assert type(layer.mlp).__name__ == "InjectedMoE"
    _check(model, original)


def test_mixtral_with_moe_disabled_keeps_moe_forward(inject):
    model = tiny_model("mixtral")
    original, engine = inject(model, kernel_backend="torch", moe={"enabled": False})
    layer = model.model.layers[0]
    assert type(layer).__name__ == "MixtralDecoderLayer"
    assert type(layer.self_attn).__name__ == "InjectedAttention"
    assert type(layer.input_layernorm).__name__ == "FusedRMSNorm"
    assert type(layer.mlp).__name__ == "MixtralSparseMoeBlock"
    _check(model, original)


def test_plan_is_jsonable_and_names_fusions(inject):
    model = tiny_model("llama")
    _, engine = inject(model, kernel_backend="torch")
    rows = engine.plan.to_json()["actions"]
    block = next(r for r in rows if r["module"] == "model.layers.0" and r["pass"] == "kernel_inject")
    assert block["details"]["replace"] == "InjectedBlock"
    assert block["details"]["fused"] == ["q_proj", "k_proj", "v_proj"]
    assert block["details"]["fused_mlp"] == ["gate_proj", "up_proj"]
    gpt2 = tiny_model("gpt2")
    _, engine = inject(gpt2, kernel_backend="torch")
    assert "attn.c_attn" in _actions(engine)["transformer.h.0"].details["transposed"]


def _ctx(model, policy, paths, layout=None, config=None):
    from policyinject.config import load_config

    layers = [ResolvedLayer(p, model.get_submodule(p), policy) for p in paths]
    cfg = load_config(None, replace_with_kernel_inject=True, kernel_backend="torch")
    ctx = PassContext(model=model, config=cfg, layers=layers, model_config=config or model.config)
    ctx.plan.tensor_parallel = layout
    return ctx


def test_plan_lists_every_problem_and_mutates_nothing():
    from policyinject_plugins.llama import LLAMA_LAYER

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = attrs.evolve(LLAMA_LAYER, attention=attrs.evolve(LLAMA_LAYER.attention, q="query"),
                          mlp=attrs.evolve(LLAMA_LAYER.mlp, activation="gelu"))
    with pytest.raises(PlanError) as info:
        KernelInjectPass().plan(_ctx(model, broken, ["model.layers.0", "model.layers.1"]))
    text = str(info.value)
    assert "model.layers.0 (LlamaDecoderLayer" in text and "'self_attn.query'" in text
    assert "model.layers.1" in text
    assert "activation 'gelu'" in text and "'silu'" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_tensor_parallel_head_counts_are_used():
    """Local head counts recorded by tensor parallelism win over the config (here they do not fit the
    unsharded weights, so planning must say so)."""
    from policyinject_plugins.llama import LLAMA_LAYER

    model = tiny_model("llama")
    from policyinject.plan_fields import LocalHeads, TensorParallelLayout

    layout = TensorParallelLayout(tp_size=2, rank=0, grain=1, heads={"model.layers.0": LocalHeads(2, 1)})
    with pytest.raises(PlanError, match=r"self_attn.q_proj has 64 output features, expected 32"):
        KernelInjectPass().plan(_ctx(model, LLAMA_LAYER, ["model.layers.0"], layout))


def test_phi_qk_layernorm_is_kept_not_dropped(inject):
    model = tiny_model("phi", qk_layernorm=True)
    original, engine = inject(model, kernel_backend="torch")
    action = _actions(engine)["model.layers.0"]
    # the per-head LayerNorms are outside the policy's roles: no block, and the attention stays as it is
    assert action.action == "replace_submodules"
    assert "self_attn.q_layernorm" in action.details["reason"]
    assert action.details["kept"] == ["self_attn"]
    assert type(model.model.layers[0].self_attn).__name__ == "PhiAttention"
    _check(model, original)


def test_unsupported_attention_implementation():
    from policyinject_plugins.llama import LLAMA_LAYER

    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(PlanError, match="attn_implementation='flex_attention'"):
        KernelInjectPass().plan(_ctx(model, LLAMA_LAYER, ["model.layers.0"]))
    model.config._attn_implementation = "sdpa"


def test_disabled_without_the_flag():
    assert KernelInjectPass().enabled(type("C", (), {"replace_with_kernel_inject": False})()) is False
    assert KernelInjectPass().enabled(type("C", (), {"replace_with_kernel_inject": True})()) is True
