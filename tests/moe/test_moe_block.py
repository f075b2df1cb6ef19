"""InjectedMoE against Hugging Face's MoE blocks (fp32, CPU): the block alone and full-model logits.

Families: Mixtral, Qwen2-MoE (shared expert with sigmoid gate, a dense layer in ``mlp_only_layers``),
Qwen3-MoE, OLMoE and GPT-OSS (router bias, softmax after top-k, transposed interleaved experts with biases,
clamped SwiGLU, tuple output).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_models import FAMILIES, tiny_moe_model  # noqa: E402
from pi_testing import rel_err  # noqa: E402

from policyinject.errors import PolicyError  # noqa: E402
from policyinject.modules.moe import InjectedMoE, inject_moe  # noqa: E402
from policyinject.policy import ExpertsSpec, MoESpec, RouterSpec  # noqa: E402

FAMILY_NAMES = tuple(FAMILIES)


def _main(out):
    return out[0] if isinstance(out, tuple) else out


def _blocks(model, spec):
    return [m for m in model.modules() if spec.matches(m)]


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_block_matches_hf(family: str, dispatch: str) -> None:
    model, spec = tiny_moe_model(family)
    block = _blocks(model, spec)[0]
    inj = InjectedMoE.build(block, spec, model.config, backend="torch", dispatch=dispatch)
    x = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = block(x), inj(x)
    assert isinstance(out, tuple) == isinstance(ref, tuple) == spec.returns_router_scores
    assert _main(out).shape == _main(ref).shape
    assert rel_err(_main(out), _main(ref)) <= 1e-5
    if spec.returns_router_scores:
        assert rel_err(out[1], ref[1]) <= 1e-6


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_model_logits_match_hf(family: str) -> None:
    model, spec = tiny_moe_model(family)
    ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        replaced = inject_moe(model, spec, backend="torch")
        out = model(ids).logits
    n_layers = model.config.num_hidden_layers - len(getattr(model.config, "mlp_only_layers", []) or [])
    assert len(replaced) == n_layers
    assert all(isinstance(model.get_submodule(p), InjectedMoE) for p in replaced)
    assert rel_err(out, ref) <= 1e-5


def test_experts_share_hf_parameters() -> None:
    """transformers 5's fused [E, 2I, H] / [E, H, I] parameters are used as they are, not copied."""
    model, spec = tiny_moe_model("mixtral")
    block = _blocks(model, spec)[0]
    inj = InjectedMoE.build(block, spec, model.config, backend="torch")
    assert inj.w13 is block.experts.gate_up_proj and inj.w2 is block.experts.down_proj
    assert inj.router_weight is block.gate.weight


@pytest.mark.parametrize("norm", [False, True])
def test_qwen_norm_topk_prob_is_read_from_config(norm: bool) -> None:
    model, spec = tiny_moe_model("qwen2_moe", norm_topk_prob=norm)
    block = _blocks(model, spec)[0]
    inj = InjectedMoE.build(block, spec, model.config, backend="torch")
    assert inj.normalize is norm
    x = torch.randn(4, 64)
    _, w, _ = inj.route(x)
    sums = w.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) is norm
    with torch.no_grad():
        assert rel_err(inj(x[None]), block(x[None])) <= 1e-5


def test_routing_is_sync_free_dense_path_matches_grouped() -> None:
    """The dense path (no host reads) and the grouped path agree, and unselected experts' overflow is masked."""
    model, spec = tiny_moe_model("qwen3_moe")
    block = _blocks(model, spec)[0]
    dense = InjectedMoE.build(block, spec, model.config, backend="torch", dispatch="dense")
    grouped = InjectedMoE.build(block, spec, model.config, backend="torch", dispatch="grouped")
    x = torch.randn(1, 1, 64)  # one token picks 4 of the 8 experts
    with torch.no_grad():
        _, _, ids = dense.route(x.reshape(-1, 64))
        unused = sorted(set(range(dense.num_experts)) - set(ids.flatten().tolist()))
        assert unused, "the test needs an expert no token selects"
        dense.w2.data[unused[0]] = float("inf")  # an unselected expert must not leak NaN/inf
        out = dense(x)
        assert torch.isfinite(out).all()
        assert rel_err(out, grouped(x)) <= 1e-6


def test_bf16_block_close_to_hf() -> None:
    model, spec = tiny_moe_model("mixtral", dtype=torch.bfloat16)
    block = _blocks(model, spec)[0]
    inj = InjectedMoE.build(block, spec, model.config, backend="torch")
    x = torch.randn(2, 9, 64).to(torch.bfloat16)
    with torch.no_grad():
        out, ref = inj(x), block(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 1e-2


def test_module_list_experts() -> None:
    """Experts as a ModuleList of w1/w3/w2 linears (older Mixtral layout) stack into the fused layout."""

    class Expert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w3 = torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 24, bias=False)
            self.w2 = torch.nn.Linear(24, 16, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(16, 4, bias=False)
            self.experts = torch.nn.ModuleList(Expert() for _ in range(4))

        def forward(self, x):
            w, i = torch.topk(torch.softmax(self.gate(x), -1), 2)
            w = w / w.sum(-1, keepdim=True)
            return sum(w[:, j, None] * torch.stack([self.experts[e](r) for e, r in zip(i[:, j].tolist(), x)])
                       for j in range(2))

    spec = MoESpec(block=Block, router=RouterSpec(top_k=2, num_experts=4, normalize=True),
                   experts=ExpertsSpec(layout="module_list", gate="w1", up="w3", down="w2", gate_up=None))
    block = Block()
    inj = InjectedMoE.build(block, spec, None, backend="torch")
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert rel_err(inj(x), block(x)) <= 1e-5


def test_errors_name_what_was_written() -> None:
    model, spec = tiny_moe_model("mixtral")
    block = _blocks(model, spec)[0]
    bad = MoESpec(block=spec.block, router=RouterSpec(top_k="no_such_attr"), experts=spec.experts)
    with pytest.raises(PolicyError, match="no_such_attr"):
        InjectedMoE.build(block, bad, model.config)
    bad = MoESpec(block=spec.block, router=spec.router, experts=ExpertsSpec(gate_up="w13"))
    with pytest.raises(PolicyError, match="'w13'"):
        InjectedMoE.build(block, bad, model.config)
    with pytest.raises(PolicyError, match="MixtralSparseMoeBlock"):
        InjectedMoE.build(model.model.layers[0].self_attn, spec, model.config)
    with pytest.raises(PolicyError, match="top_k 9"):
        RouterSpec(top_k=9, num_experts=4).resolve(None)
    with pytest.raises(PolicyError, match="shared_gate"):
        MoESpec(block=spec.block, router=spec.router, experts=spec.experts, shared_gate="g")
    with pytest.raises(PolicyError, match="no MixtralSparseMoeBlock"):
        inject_moe(torch.nn.Linear(2, 2), spec, model.config)


def test_router_with_unnamed_bias_is_refused() -> None:
    model, spec = tiny_moe_model("gpt_oss")
    block = _blocks(model, spec)[0]
    import attrs

    no_bias = attrs.evolve(spec, router=attrs.evolve(spec.router, bias=None))
    with pytest.raises(PolicyError, match="has a bias"):
        InjectedMoE.build(block, no_bias, model.config)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_quantized_experts_module(bits: int, group) -> None:
    """quantize_experts: the module computes with exactly the dequantized weights (torch and Triton paths)."""
    from policyinject.kernels.moe import dequantize_experts

    model, spec = tiny_moe_model("qwen2_moe")
    block = _blocks(model, spec)[0]
    quant = InjectedMoE.build(block, spec, model.config, backend="torch")
    quant.quantize_experts(bits, group)
    assert "w13" not in dict(quant.named_parameters()) and "w13_qweight" in dict(quant.named_buffers())
    import copy

    floaty = InjectedMoE.build(copy.deepcopy(block), spec, model.config, backend="torch")  # not the HF weights
    floaty.w13.data = dequantize_experts(quant.experts_weight("w13"))
    floaty.w2.data = dequantize_experts(quant.experts_weight("w2"))
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        ref = floaty(x)
        assert rel_err(quant(x), ref) <= 1e-5
        hf_err = rel_err(quant(x), block(x))  # quantization error against the float HF block
        assert 0 < hf_err <= (2e-2 if bits == 8 else 2e-1)
        pytest.importorskip("triton")
        quant.backend = "triton"
        for tokens in (1, 12):
            assert rel_err(quant(x[:, :tokens]), floaty(x[:, :tokens])) <= 1e-5
    with pytest.raises(PolicyError, match="already quantized"):
        quant.quantize_experts(bits, group)
