"""MoE models through ``init_inference(replace_with_kernel_inject=True)`` on one process (CPU, fp32):
InjectedBlocks with the MoE block in the MLP slot, logits equal to Hugging Face, greedy tokens from the
decode engine (static KV cache) equal to Hugging Face ``generate``, quantized experts, and the plan errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_models import tiny_moe_model  # noqa: E402

import policyinject as pi  # noqa: E402
from policyinject.errors import PlanError  # noqa: E402
from policyinject.modules.block import InjectedBlock  # noqa: E402
from policyinject.modules.moe import InjectedMoE  # noqa: E402

IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_injected_moe_model_generates_through_the_engine(family: str) -> None:
    model, _ = tiny_moe_model(family)
    with torch.no_grad():
        ref = model(IDS).logits
        ref_tokens = model.generate(IDS, max_new_tokens=6, do_sample=False)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch")
    layers = list(model.model.layers)
    assert all(isinstance(layer, InjectedBlock) for layer in layers)
    assert any(isinstance(layer.mlp, InjectedMoE) for layer in layers)
    assert engine.plan.decode is not None and engine.plan.decode.problems == ()
    assert engine._get_decoder() is not None  # the engine's decoder, not Hugging Face's loop
    with torch.no_grad():
        assert _rel(engine(IDS).logits, ref) < 1e-5
        assert torch.equal(engine.generate(IDS, max_new_tokens=6, do_sample=False), ref_tokens)


def test_qwen2_moe_dense_layers_keep_the_mlp_role() -> None:
    model, _ = tiny_moe_model("qwen2_moe")  # mlp_only_layers=[1]
    pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch")
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["InjectedMoE", "InjectedMLP", "InjectedMoE"]
    assert model.model.layers[0].mlp.shared is not None


@pytest.mark.parametrize("quant, bits, tol", [
    (dict(dtype="int8"), 8, 1e-2),
    (dict(dtype="fp32", quant={"enabled": True, "weight": {"num_bits": 4, "group_size": 16}}), 4, 1.5e-1),
])
def test_quantized_experts(quant: dict, bits: int, tol: float) -> None:
    from policyinject.kernels.moe import dequantize_experts

    model, _ = tiny_moe_model("mixtral")
    original = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    with torch.no_grad():
        ref = model(IDS).logits
    engine = pi.init_inference(model, replace_with_kernel_inject=True, kernel_backend="torch", **quant)
    moe = model.model.layers[0].mlp
    assert isinstance(moe, InjectedMoE)
    assert {n: b for n, (b, _, _) in moe._quantized.items()} == {"w13": bits, "w2": bits}
    details = [a.details["moe"] for a in engine.plan.actions if "moe" in a.details]
    assert details and details[0]["experts_quant"].startswith(f"int{bits}")
    assert 0 < _rel(dequantize_experts(moe.experts_weight("w2")), original) < tol
    with torch.no_grad():
        err = _rel(engine(IDS).logits.float(), ref)
    assert 0 < err < 0.5  # a tiny random model, every linear quantized too (fp16 compute with int8)


def test_moe_disabled_keeps_the_model_block() -> None:
    model, spec = tiny_moe_model("mixtral")
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch",
                               moe={"enabled": False})
    assert spec.matches(model.model.layers[0].mlp)
    assert engine.plan.decode is not None and engine.plan.decode.problems  # falls back to Hugging Face


def test_expert_count_mismatch_names_the_key() -> None:
    model, spec = tiny_moe_model("mixtral")  # 4 experts
    with pytest.raises(PlanError, match=r"moe\.moe_experts \[8\] does not include the model's 4 experts"):
        pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, moe={"moe_experts": [8]})
    assert spec.matches(model.model.layers[0].mlp)  # planning failed: the model is untouched


def test_ep_without_a_process_group_is_a_plan_error() -> None:
    model, _ = tiny_moe_model("mixtral")
    with pytest.raises(PlanError, match=r"moe\.ep_size=2 needs a process group"):
        pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, moe={"ep_size": 2})


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_decode_with_cuda_graphs(family: str) -> None:
    """Routing and the fused MoE kernel run inside the captured decode graphs (no host syncs)."""
    model, _ = tiny_moe_model(family)
    ids = IDS.cuda()
    with torch.no_grad():
        ref_tokens = model.cuda().generate(ids, max_new_tokens=8, do_sample=False)
    eager_model, _ = tiny_moe_model(family)
    eager = pi.init_inference(eager_model, dtype="fp32", replace_with_kernel_inject=True)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, enable_cuda_graph=True)
    assert engine.plan.decode.use_graphs and engine.plan.decode.problems == ()
    with torch.no_grad():
        tokens = engine.generate(ids, max_new_tokens=8, do_sample=False)
        again = engine.generate(ids, max_new_tokens=8, do_sample=False)  # replays the captured graphs
        eager_tokens = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, again) and torch.equal(tokens, eager_tokens)
    assert torch.equal(tokens, ref_tokens)
