"""FusedRMSNorm / FusedLayerNorm: drop-in equivalence with the HF / torch modules, shared parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernel_checks import assert_close, poisoned_alloc, randn
from policyinject.modules.norms import FusedLayerNorm, FusedRMSNorm, find_eps

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

BACKENDS = ["torch", "triton"]


def _randomise(module: nn.Module, scale: float = 1.0) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, scale=scale))
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_from_llama(backend: str, dtype: torch.dtype) -> None:
    hf = _randomise(LlamaRMSNorm(80, eps=1e-5)).to(dtype)
    fused = FusedRMSNorm.from_module(hf, backend=backend)
    assert fused.weight is hf.weight
    assert fused.eps == 1e-5 and fused.weight_offset == 0.0 and fused.backend == backend
    x, r = randn(2, 3, 80, dtype=dtype), randn(2, 3, 80, dtype=dtype)
    with torch.no_grad(), poisoned_alloc():
        y = fused(x)
        y2, s = fused.forward_add(x, r)
    with torch.no_grad():
        assert_close(y, hf(x))
        assert_close(s, x + r)  # bit-exact on a GPU; the interpreter truncates fp32 -> bf16
        assert_close(y2, hf(x + r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_from_gemma(backend: str) -> None:
    hf = _randomise(GemmaRMSNorm(48, eps=1e-6), scale=0.2).to(torch.bfloat16)
    fused = FusedRMSNorm.from_module(hf, weight_offset=1.0, backend=backend)
    assert fused.weight is hf.weight and fused.eps == 1e-6
    x = randn(4, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(fused(x), hf(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_from_torch(backend: str, affine: str) -> None:
    ln = nn.LayerNorm(56, eps=1e-5, elementwise_affine=affine != "none", bias=affine == "weight+bias")
    _randomise(ln)
    fused = FusedLayerNorm.from_module(ln, backend=backend)
    assert fused.weight is ln.weight and fused.bias is ln.bias
    x, r = randn(3, 56, scale=2.0), randn(3, 56)
    with torch.no_grad(), poisoned_alloc():
        y = fused(x)
        y2, s = fused.forward_add(x, r)
    with torch.no_grad():
        assert_close(y, ln(x))
        assert_close(y2, ln(x + r))
        assert torch.equal(s, x + r)


def test_state_dict_and_parameters_are_shared() -> None:
    hf = LlamaRMSNorm(16)
    fused = FusedRMSNorm.from_module(hf)
    assert list(fused.state_dict()) == ["weight"]
    assert [id(p) for p in fused.parameters()] == [id(hf.weight)]
    with torch.no_grad():
        hf.weight.mul_(2)  # an update through either module is seen by both
    assert torch.equal(fused.weight, hf.weight)
    ln = nn.LayerNorm(8)
    assert list(FusedLayerNorm.from_module(ln).state_dict()) == ["weight", "bias"]
    assert list(FusedLayerNorm.from_module(nn.LayerNorm(8, elementwise_affine=False)).state_dict()) == []


def test_backend_attribute_switches_path() -> None:
    fused = FusedRMSNorm(24, eps=1e-6, backend="torch")
    _randomise(fused)
    x = randn(3, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        a = fused(x.float())
        fused.backend = "triton"
        b = fused(x.float())
    assert_close(b, a)
    fused.backend = "bogus"
    with pytest.raises(ValueError, match="backend"):
        fused(x)


def test_constructors_and_errors() -> None:
    assert torch.equal(FusedRMSNorm(4).weight, torch.ones(4))
    assert torch.equal(FusedRMSNorm(4, weight_offset=1.0).weight, torch.zeros(4))  # identity scale
    ln = FusedLayerNorm(6)
    assert torch.equal(ln.weight, torch.ones(6)) and torch.equal(ln.bias, torch.zeros(6))
    assert FusedLayerNorm(6, bias=False).bias is None
    with pytest.raises(ValueError, match="backend"):
        FusedRMSNorm(4, backend="cuda")
    with pytest.raises(ValueError, match="hidden_size"):
        FusedRMSNorm()
    with pytest.raises(ValueError, match="no weight"):
        FusedRMSNorm.from_module(nn.Identity())
    with pytest.raises(ValueError, match="not 1-d"):
        FusedLayerNorm.from_module(nn.LayerNorm((4, 4)))
    with pytest.raises(ValueError, match="epsilon"):
        find_eps(nn.Identity())
    assert FusedRMSNorm.from_module(LlamaRMSNorm(4, eps=1e-3), eps=1e-2).eps == 1e-2
    assert "weight_offset=1.0" in repr(FusedRMSNorm(4, weight_offset=1.0))
