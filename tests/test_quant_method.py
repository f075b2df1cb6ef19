"""quant.weight.method: config key, plan details, and what the pass stores for rtn / hqq / auto."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from policyinject.config import load_config
from policyinject import ConfigError
from policyinject.errors import PlanError
from policyinject.kernels.quant_search import hqq_quantize_weight
from policyinject.kernels.quantize import dequantize_weight, quantize_weight
from policyinject.modules.quant_linear import QuantLinear
from policyinject.modules.tensor_parallel import RowParallelLinear
from policyinject.passes.base import PassContext, ResolvedLayer
from policyinject.passes.quantize import QuantizePass, quant_spec_from_config, quantize_linear, resolve_method
from policyinject.policy import MLPSpec, Policy


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(192, 256), nn.Linear(256, 192, bias=False)


POLICY = Policy(Block, mlp=MLPSpec(fc1="fc1", fc2="fc2"))


def _apply(block: Block, **quant) -> list:
    cfg = load_config(None, quant={"enabled": True, **quant})
    ctx = PassContext(model=block, config=cfg, layers=[ResolvedLayer("", block, POLICY)], device=torch.device("cpu"))
    p = QuantizePass()
    actions = p.plan(ctx)
    p.apply(ctx, actions)
    return actions


def test_config_key_default_values_and_errors() -> None:
    assert load_config(None).quant.weight.method == "auto"
    assert load_config(None, quant={"weight": {"method": "hqq"}}).quant.weight.method == "hqq"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, quant={"weight": {"method": "gptq2"}})
    assert load_config(None, quant={"weight": {"method": "gptq"}}).quant.weight.method == "gptq"  # calibrated
    assert quant_spec_from_config(load_config(None, quant={"weight": {"method": "rtn"}})).method == "rtn"
    assert load_config(load_config(None, quant={"weight": {"method": "rtn"}}).to_dict()).quant.weight.method == "rtn"


def test_resolve_method() -> None:
    assert [resolve_method(m, b) for m in ("auto", "rtn", "hqq") for b in (4, 8)] == ["hqq", "rtn", "rtn", "rtn",
                                                                                      "hqq", "hqq"]
    assert resolve_method("auto", 4, symmetric=True) == "rtn"
    assert resolve_method("awq", 4) == "awq" and resolve_method("gptq", 8, symmetric=True) == "gptq"
    with pytest.raises(PlanError, match="quant.weight.method"):
        resolve_method("smoothquant", 4)
    with pytest.raises(PlanError, match="asymmetric"):
        resolve_method("hqq", 4, symmetric=True)


def test_hqq_with_symmetric_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="asymmetric"):
        _apply(Block(), weight={"num_bits": 4, "q_type": "symmetric", "method": "hqq"})


@pytest.mark.parametrize("symmetric, method", [(True, "auto"), (True, "rtn"), (False, "auto"), (False, "rtn"),
                                               (False, "hqq")])
def test_pass_stores_the_method_grid(method: str, symmetric: bool) -> None:
    torch.manual_seed(0)
    block = Block()
    w = block.fc1.weight.detach().clone()
    q_type = "symmetric" if symmetric else "asymmetric"
    actions = _apply(block, weight={"num_bits": 4, "q_type": q_type, "method": method})
    used = resolve_method(method, 4, symmetric)
    assert {a.details["method"] for a in actions} == {used}
    assert isinstance(block.fc1, QuantLinear) and block.fc1.symmetric is symmetric
    expected = (hqq_quantize_weight(w, 4, 32) if used == "hqq"  # 192 inputs: the default group, 32
                else quantize_weight(w, 4, 32, symmetric=symmetric))
    got = block.fc1.quantized_weight()
    assert torch.equal(got.qweight, expected.qweight) and torch.equal(got.scales, expected.scales)
    assert (got.zeros is None) == symmetric
    x = torch.randn(3, 192)
    ref = x @ dequantize_weight(expected).T + block.fc1.bias
    assert torch.allclose(block.fc1(x), ref, atol=1e-5)


def test_int8_auto_stays_round_to_nearest() -> None:
    torch.manual_seed(1)
    block = Block()
    w = block.fc2.weight.detach().clone()
    actions = _apply(block, weight={"num_bits": 8})
    assert {a.details["method"] for a in actions} == {"rtn"}
    assert torch.equal(block.fc2.quantized_weight().qweight, quantize_weight(w, 8).qweight)


def test_hqq_through_tensor_parallel_wrapper_and_transposed() -> None:
    torch.manual_seed(2)
    full = nn.Linear(128, 16)
    row = RowParallelLinear.from_linear(full, cols=range(64, 128))
    w_local = full.weight.detach()[:, 64:].clone()
    row = quantize_linear(row, 4, 32, False, "torch", method="hqq")  # a new wrapper (the old one unchanged)
    assert isinstance(row.local, QuantLinear) and row.local.in_features == 64
    assert torch.equal(row.local.zeros, hqq_quantize_weight(w_local, 4, 32).zeros)
    conv = nn.Linear(16, 128, bias=False)  # stands for a transposed [in, out] weight
    q = quantize_linear(conv, 4, 32, False, "torch", transposed=True, method="hqq")
    assert q.in_features == 128 and q.out_features == 16
    assert torch.equal(q.zeros, hqq_quantize_weight(conv.weight.detach().t(), 4, 32).zeros)
