"""QuantLinear and DecodeLinear: nn.Linear contract, cat / narrow helpers, both backends."""

from __future__ import annotations

import os

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch import nn

from kernel_checks import assert_close, poisoned_alloc, rel_err
from policyinject.kernels.quant_reference import quant_matmul_reference
from policyinject.kernels.quantize import dequantize_weight
from policyinject.modules.fast_linear import DecodeLinear
from policyinject.modules.quant_linear import QuantLinear


def _linear(in_f: int, out_f: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("bits, group, tol", [(8, None, 0.01), (4, 32, 0.12), (4, None, 0.12)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_forward_matches_linear_both_backends(bits, group, tol, symmetric) -> None:
    lin = _linear(96, 24)
    q = QuantLinear.from_linear(lin, bits, group, symmetric, backend="torch")
    x = torch.randn(2, 3, 96)
    ref = lin(x).detach()
    y = q(x)
    assert y.shape == (2, 3, 24) and y.dtype == x.dtype
    assert rel_err(y, ref) < tol
    q.backend = "triton"
    with poisoned_alloc():
        y_t = q(x[:, :1])
    assert_close(y_t, quant_matmul_reference(x[:, :1], q.quantized_weight(), q.bias))


def test_attributes_state_dict_and_repr() -> None:
    q = QuantLinear.from_linear(_linear(576, 40), 4, backend="torch")
    assert (q.in_features, q.out_features, q.group_size, q.num_bits) == (576, 40, 32, 4)  # the default group
    assert q.weight_bytes() == 40 * 288 + 40 * 18 * 2
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}
    q2 = QuantLinear.from_linear(_linear(576, 40), 4, backend="torch")
    q2.load_state_dict(sd)
    x = torch.randn(1, 576)
    assert torch.equal(q(x), q2(x))
    assert "bits=4, group_size=32" in repr(q)
    assert QuantLinear.from_linear(_linear(64, 8), 8, symmetric=False).zeros is not None


def test_transposed_conv1d_weight() -> None:
    lin = _linear(64, 16)
    conv_like = nn.Module()
    conv_like.weight = nn.Parameter(lin.weight.detach().t().contiguous())
    conv_like.bias = lin.bias
    q = QuantLinear.from_linear(conv_like, 8, transposed=True, backend="torch")
    x = torch.randn(3, 64)
    assert rel_err(q(x), lin(x).detach()) < 0.01


def test_module_dtype_cast_keeps_scale_dtype() -> None:
    q = QuantLinear.from_linear(_linear(64, 8), 4, 32, symmetric=False)
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert q.bias.dtype == torch.bfloat16 and q.qweight.dtype == torch.uint8
    assert q(torch.randn(1, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bf16_activation_with_fp32_bias() -> None:
    q = QuantLinear.from_linear(_linear(64, 8), 8, backend="torch")
    y = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("bits, symmetric", [(8, True), (4, False)])
def test_cat_matches_separate(bits, symmetric) -> None:
    parts = [_linear(128, 8), _linear(128, 4, bias=False), _linear(128, 12)]
    qs = [QuantLinear.from_linear(p, bits, 64, symmetric, backend="torch") for p in parts]
    fused = QuantLinear.cat(qs)
    x = torch.randn(5, 128)
    assert fused.out_features == 24
    assert torch.allclose(fused(x), torch.cat([q(x) for q in qs], -1), atol=1e-5)


def test_cat_rejects_mismatches() -> None:
    a = QuantLinear.from_linear(_linear(64, 8), 8)
    with pytest.raises(ValueError, match="equal"):
        QuantLinear.cat([a, QuantLinear.from_linear(_linear(64, 8), 4)])
    with pytest.raises(ValueError, match="equal"):
        QuantLinear.cat([a, QuantLinear.from_linear(_linear(32, 8), 8)])
    with pytest.raises(TypeError):
        QuantLinear.cat([a, _linear(64, 8)])


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (8, None), (4, None)])
def test_narrow_out_and_in_match_sharded_full_weight(bits, group) -> None:
    q = QuantLinear.from_linear(_linear(128, 16), bits, group, symmetric=bits == 8, backend="torch")
    w = dequantize_weight(q.quantized_weight())
    x = torch.randn(3, 128)
    rows = q.narrow_out(4, 8)
    assert torch.allclose(rows(x), q(x)[:, 4:12], atol=1e-5)
    cols = q.narrow_in(64, 64, keep_bias=False)
    assert cols.in_features == 64
    assert torch.allclose(cols(x[:, 64:]), x[:, 64:] @ w[:, 64:].t(), atol=1e-4)
    # the two column halves plus the bias give the whole output (row-parallel all-reduce)
    halves = q.narrow_in(0, 64, keep_bias=False)(x[:, :64]) + cols(x[:, 64:]) + q.bias
    assert torch.allclose(halves, q(x), atol=1e-4)


def test_narrow_errors() -> None:
    q = QuantLinear.from_linear(_linear(128, 16), 4, 32)
    with pytest.raises(ValueError, match="align with group_size=32"):
        q.narrow_in(16, 64)
    with pytest.raises(ValueError, match="outside"):
        q.narrow_out(10, 10)
    pc = QuantLinear.from_linear(_linear(100, 16), 4)  # per channel (no 32/64/128 divides 100)
    with pytest.raises(ValueError, match="even"):
        pc.narrow_in(1, 50)


def test_decode_linear_matches_linear() -> None:
    lin = _linear(64, 24)
    d = DecodeLinear.from_linear(lin, backend="triton", max_m=4)
    for shape in [(1, 64), (2, 1, 64), (8, 64)]:  # 8 rows > max_m: F.linear
        x = torch.randn(*shape)
        with poisoned_alloc():
            y = d(x)
        assert_close(y, lin(x).detach())
    assert "max_m=4" in repr(d)
    with pytest.raises(ValueError):
        DecodeLinear.from_linear(lin, max_m=100)


def test_decode_linear_cat_and_narrow() -> None:
    a, b = _linear(32, 8), _linear(32, 4, bias=False)
    fused = DecodeLinear.cat([DecodeLinear.from_linear(a), DecodeLinear.from_linear(b)])
    x = torch.randn(1, 32)
    assert torch.allclose(fused(x), torch.cat([a(x), b(x)], -1).detach(), atol=1e-6)
    assert torch.allclose(fused.narrow_out(8, 4)(x), b(x).detach(), atol=1e-6)
    col = DecodeLinear.from_linear(a).narrow_in(0, 16, keep_bias=False)
    assert torch.allclose(col(x[:, :16]), x[:, :16] @ a.weight[:, :16].t().detach(), atol=1e-6)
