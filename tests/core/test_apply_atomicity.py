"""Atomicity of apply: plan-time checks refuse before any change; a failing pass leaves a loud, poisoned model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import policyinject as pi
from policyinject.errors import ApplyError, PlanError, PoisonedModelError
from policyinject.testing.presets import tiny_model


def _model(layers: int = 4) -> torch.nn.Module:
    return tiny_model("llama", num_hidden_layers=layers)


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, state: dict, types: list) -> bool:
    now = model.state_dict()
    return (list(now) == list(state) and all(torch.equal(now[k], state[k]) and now[k].dtype == state[k].dtype
                                             for k in state)
            and types == [type(m).__name__ for m in model.modules()])


IDS = torch.tensor([[1, 5, 9, 3]])


def test_quantize_failure_in_third_layer_lists_layers_and_poisons(monkeypatch):
    import policyinject.passes.quantize as q

    model = _model()
    original = q.quantize_action
    layer2 = {n: p.detach().clone() for n, p in model.model.layers[2].named_parameters()}

    def failing(path, mod, payload, prepared=None):
        if path == "model.layers.2.self_attn.v_proj":  # the third linear of the third layer
            raise RuntimeError("CUDA out of memory (injected)")
        return original(path, mod, payload, prepared)

    monkeypatch.setattr(q, "quantize_action", failing)
    with pytest.raises(ApplyError) as info:
        pi.init_inference(model, dtype="int8", kernel_backend="torch")
    err = info.value
    assert err.failed_pass == "quantize" and err.failed_at == "model.layers.2"
    assert err.converted == ["model.layers.0", "model.layers.1"]
    assert err.unconverted == ["model.layers.2", "model.layers.3"]
    assert "CUDA out of memory (injected)" in str(err) and "model.layers.3" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    # the failing layer is itself untouched: q_proj and k_proj were built, but nothing was swapped in
    layer = model.model.layers[2]
    assert all(type(m) is torch.nn.Linear for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                   layer.self_attn.v_proj, layer.mlp.down_proj))
    assert all(torch.equal(p, layer2[n]) for n, p in layer.named_parameters())
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "QuantLinear"
    with pytest.raises(PoisonedModelError, match="(?s)partly converted.*pass 'quantize'"):
        model(IDS)
    with pytest.raises(PoisonedModelError):
        model.generate(IDS, max_new_tokens=2)
    with pytest.raises(PlanError, match="partly converted"):
        pi.init_inference(model, dtype="int8")


def test_kernel_inject_failure_in_third_layer(monkeypatch):
    from policyinject.modules.block import InjectedBlock

    model = _model()
    calls = []
    original = InjectedBlock.build.__func__

    def build(cls, layer, *args, **kwargs):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("triton compile error (injected)")
        return original(cls, layer, *args, **kwargs)

    monkeypatch.setattr(InjectedBlock, "build", classmethod(build))
    third = model.model.layers[2]
    with pytest.raises(ApplyError) as info:
        pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch")
    err = info.value
    assert err.failed_pass == "kernel_inject" and err.failed_at == "model.layers.2"
    assert err.completed_passes == ["dtype"]
    assert err.converted[:2] == ["model.layers.0", "model.layers.1"]
    assert "model.layers.2" in err.unconverted and "model.layers.3" in err.unconverted
    assert model.model.layers[2] is third and type(model.model.layers[1]).__name__ == "InjectedBlock"
    with pytest.raises(PoisonedModelError):
        model(IDS)


def _checkpoint(tmp_path, model, drop=(), change=None) -> str:
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if change:
        tensors.update(change)
    tensors.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    return str(tmp_path)


def test_missing_tensor_is_a_plan_error_before_any_change(tmp_path):
    model = _model(2)
    ckpt = _checkpoint(tmp_path, model, drop=("model.layers.1.mlp.down_proj.weight",))
    state, types = _state(model), [type(m).__name__ for m in model.modules()]
    with pytest.raises(PlanError, match=r"missing 1 tensors.*model\.layers\.1\.mlp\.down_proj\.weight"):
        pi.init_inference(model, dtype="int8", checkpoint=ckpt, replace_with_kernel_inject=True)
    assert _same(model, state, types)
    model(IDS)  # not poisoned: a PlanError leaves the model usable


def test_missing_norm_of_a_meta_model_is_a_plan_error(tmp_path):
    model = _model(2)
    ckpt = _checkpoint(tmp_path, model, drop=("model.norm.weight",))
    with torch.device("meta"):
        meta = type(model)(model.config)
    types = [type(m).__name__ for m in meta.modules()]
    with pytest.raises(PlanError, match=r"model\.norm\.weight"):
        pi.init_inference(meta, dtype="fp32", checkpoint=ckpt)
    assert types == [type(m).__name__ for m in meta.modules()]
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_wrong_shape_and_integer_data_are_plan_errors_unexpected_names_a_lint(tmp_path):
    model = _model(2)
    bad = {"model.layers.0.mlp.up_proj.weight": torch.zeros(7, 64),
           "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.int8)}
    ckpt = _checkpoint(tmp_path, model, change=bad)
    with pytest.raises(PlanError) as info:
        pi.plan_inference(model, checkpoint=ckpt)
    assert "up_proj.weight: shape (7, 64) in the checkpoint, the model expects (128, 64)" in str(info.value)
    assert "q_proj.weight: stored as I8" in str(info.value)
    ckpt2 = _checkpoint(tmp_path / "x" if (tmp_path / "x").mkdir() is None else None, model,
                        change={"extra.rotary.inv_freq": torch.ones(3)})
    plan = pi.plan_inference(model, checkpoint=ckpt2)
    assert any("extra.rotary.inv_freq" in line for line in plan.lint)


def test_memory_check_refuses_with_both_numbers_and_changes_nothing():
    model = _model(2)
    state, types = _state(model), [type(m).__name__ for m in model.modules()]
    seen = []

    def probe(device):
        seen.append(device)
        return 1 << 10, 80 << 30  # 1 KiB free of 80 GiB (less than one tiny layer)

    with pytest.raises(PlanError) as info:
        pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, memory_probe=probe)
    msg = str(info.value)
    assert "device memory" in msg and "0.00 GiB of 80.00 GiB are free" in msg and "GiB for one layer" in msg
    assert seen == [torch.device("cpu")]
    assert _same(model, state, types)
    engine = pi.init_inference(model, dtype="fp32", memory_probe=lambda d: (8 << 30, 80 << 30))
    assert "of 8.00 GiB free" in engine.report["summary"]["device memory (planned)"]


def test_memory_estimate_counts_quantized_final_bytes_and_one_layer():
    from policyinject import preflight

    model = _model(2)
    plan = pi.plan_inference(model, dtype="int8")
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    est = preflight.estimate_memory(model, plan, plan.layers, torch.device("cuda", 0))
    assert est.final_bytes == plan.quantize.model_bytes_after and est.resident_bytes == 0
    assert est.transient_bytes == layer_bytes


def test_triton_backend_unavailable_is_a_plan_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model(2)
    with pytest.raises(PlanError, match="kernel_backend='triton' on cpu"):
        pi.plan_inference(model, replace_with_kernel_inject=True, kernel_backend="triton")


def test_plan_error_during_apply_is_kept_only_while_nothing_changed(monkeypatch):
    import policyinject.quant.hook as hook

    def refuse(ctx, actions):  # a check as the quantize pass starts: nothing changed yet
        raise PlanError("quant.checkpoint: refused (injected)")

    monkeypatch.setattr(hook, "prepare_quantized", refuse)
    model = _model(2)
    state, types = _state(model), [type(m).__name__ for m in model.modules()]
    with pytest.raises(PlanError, match="refused"):
        pi.init_inference(model, dtype="int8", kernel_backend="torch")
    assert _same(model, state, types)
    model(IDS)  # usable: not poisoned

    def write_then_refuse(ctx, actions):  # an in-place write, then a PlanError: the model has changed
        with torch.no_grad():
            ctx.model.model.norm.weight.mul_(2.0)
        raise PlanError("refused after a write (injected)")

    monkeypatch.setattr(hook, "prepare_quantized", write_then_refuse)
    with pytest.raises(ApplyError) as info:
        pi.init_inference(model, dtype="int8", kernel_backend="torch")
    assert "refused after a write" in str(info.value) and info.value.failed_pass == "quantize"
    with pytest.raises(PoisonedModelError):
        model(IDS)


# ------------------------------------------------------------------------------------------ weights at plan time
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_to_quantize_is_a_plan_error_naming_it(bad):
    model = _model()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[3, 1] = bad
    types = [type(m).__name__ for m in model.modules()]
    state = {k: (v.data_ptr(), v.dtype, v.detach().nan_to_num(0.0, 0.0, 0.0).clone()) for k, v in
             model.state_dict().items()}
    with pytest.raises(PlanError) as err:
        pi.init_inference(model, dtype="int8")
    assert "model.layers.2.mlp.down_proj.weight holds NaN or infinite values" in str(err.value)
    assert len(err.value.problems) == 1  # only the bad weight is named
    assert types == [type(m).__name__ for m in model.modules()]
    now = model.state_dict()
    assert now.keys() == state.keys() and all(
        (now[k].data_ptr(), now[k].dtype) == state[k][:2] and torch.equal(now[k].nan_to_num(0.0, 0.0, 0.0), state[k][2])
        for k in state)
    # left out of quantization, the same weight is not the plan's business
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[3, 1] = 0.0
    assert pi.plan_inference(model, dtype="int8").quantize.linears > 0


def test_mixed_dtype_linears_of_an_injected_layer_are_a_plan_error_naming_them():
    model = _model()
    lin = model.model.layers[1].mlp.down_proj
    lin.weight.data = lin.weight.data.half()
    state, types = _state(model), [type(m).__name__ for m in model.modules()]
    with pytest.raises(PlanError) as err:
        pi.init_inference(model, dtype="auto", replace_with_kernel_inject=True)
    text = str(err.value)
    assert "model.layers.1.mlp.down_proj.weight float16 (the other 6: float32)" in text
    assert "model.to(torch.float32)" in text and "model.layers.0" not in text
    assert _same(model, state, types)
    # a planned cast to one dtype makes the layers agree: no error, and the forward runs
    engine = pi.init_inference(model, dtype="bf16", replace_with_kernel_inject=True)
    assert engine(IDS).logits.dtype == torch.bfloat16
