"""The quantization defaults: int4 is asymmetric, group 32, HQQ; int8 symmetric, per output channel, round to
nearest; an explicit ``q_type`` is always honoured; odd ``in_features`` and tensor-parallel shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from policyinject.config import ConfigError, WeightQuantConfig, json_schema, load_config
from policyinject.kernels.quant_search import hqq_quantize_weight
from policyinject.kernels.quantize import INT4_DEFAULT_GROUP, quantize_weight
from policyinject.modules.quant_linear import QuantLinear
from policyinject.passes.base import PassContext, ResolvedLayer
from policyinject.passes.quantize import QuantizePass, plan_group_size, quant_spec_from_config, resolve_method
from policyinject.policy import MLPSpec, Policy


class Block(nn.Module):
    def __init__(self, h: int = 576, i: int = 1536) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, i), nn.Linear(i, h, bias=False)


POLICY = Policy(Block, mlp=MLPSpec(fc1="fc1", fc2="fc2"))


def _ctx(block: Block, **config) -> PassContext:
    cfg = load_config(None, **config)
    return PassContext(model=block, config=cfg, layers=[ResolvedLayer("", block, POLICY)], device=torch.device("cpu"))


def _resolved(**config) -> tuple:
    """(bits, symmetric, method, {linear: group}) that the plan gives a SmolLM2-shaped MLP."""
    ctx = _ctx(Block(), **config)
    actions = QuantizePass().plan(ctx)
    spec = quant_spec_from_config(ctx.config)
    groups = {a.path: a.details["group_size"] for a in actions}
    assert {a.details["symmetric"] for a in actions} == {spec.symmetric}
    methods = {a.details["method"] for a in actions}
    assert len(methods) == 1
    return spec.num_bits, spec.symmetric, methods.pop(), groups


INT4 = {"quant": {"enabled": True, "weight": {"num_bits": 4}}}


@pytest.mark.parametrize("config, expected", [
    (INT4, (4, False, "hqq", {"fc1": 32, "fc2": 32})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 4, "q_type": "auto"}}}, (4, False, "hqq", {"fc1": 32, "fc2": 32})),
    ({"quant": {"enabled": True}}, (8, True, "rtn", {"fc1": "per-channel", "fc2": "per-channel"})),
    ({"dtype": "int8"}, (8, True, "rtn", {"fc1": "per-channel", "fc2": "per-channel"})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 8, "q_type": "auto"}}},
     (8, True, "rtn", {"fc1": "per-channel", "fc2": "per-channel"})),
    # an explicit q_type is always honoured
    ({"quant": {"enabled": True, "weight": {"num_bits": 4, "q_type": "symmetric"}}},
     (4, True, "rtn", {"fc1": 32, "fc2": 32})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 4, "q_type": "asymmetric"}}},
     (4, False, "hqq", {"fc1": 32, "fc2": 32})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 8, "q_type": "asymmetric"}}},
     (8, False, "rtn", {"fc1": "per-channel", "fc2": "per-channel"})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 4, "group_size": 64, "method": "rtn"}}},
     (4, False, "rtn", {"fc1": 64, "fc2": 64})),
    ({"quant": {"enabled": True, "weight": {"num_bits": 4, "q_groups": 3}}}, (4, False, "hqq", {"fc1": 192,
                                                                                              "fc2": 512})),
])
def test_defaults_resolve_as_documented(config: dict, expected: tuple) -> None:
    assert _resolved(**config) == expected


def test_config_key_defaults_and_round_trip() -> None:
    weight = load_config(None).quant.weight
    assert (weight.num_bits, weight.q_type, weight.q_groups, weight.group_size, weight.method) == (8, "auto", 1, None,
                                                                                                  "auto")
    assert weight.symmetric and not WeightQuantConfig(num_bits=4).symmetric
    assert WeightQuantConfig(num_bits=4, q_type="symmetric").symmetric
    assert not WeightQuantConfig(num_bits=8, q_type="asymmetric").symmetric
    assert load_config(None).quant.activation.q_type == "symmetric"  # activation keeps DeepSpeed's default
    for q_type in ("auto", "symmetric", "asymmetric"):
        cfg = load_config(None, quant={"enabled": True, "weight": {"num_bits": 4, "q_type": q_type}})
        assert load_config(cfg.to_dict()) == cfg and cfg.quant.weight.q_type == q_type
    with pytest.raises(ConfigError, match="quant.weight.q_type"):
        load_config(None, quant={"weight": {"q_type": "sym"}})
    prop = json_schema()["$defs"]["WeightQuantConfig"]["properties"]["q_type"]
    assert prop["default"] == "auto"


def test_group_size_for_follows_the_pass_default() -> None:
    assert WeightQuantConfig(num_bits=4).group_size_for(896) == INT4_DEFAULT_GROUP == 32
    assert WeightQuantConfig(num_bits=4).group_size_for(1000) == 1000  # 32 does not divide: per output channel
    assert WeightQuantConfig(num_bits=8).group_size_for(896) == 896
    assert WeightQuantConfig(num_bits=4, q_groups=7).group_size_for(896) == 128


def test_int4_default_stores_hqq_group_32_and_int8_default_rtn_per_channel() -> None:
    torch.manual_seed(0)
    block = Block(192, 256)
    w1, w2 = block.fc1.weight.detach().clone(), block.fc2.weight.detach().clone()
    ctx = _ctx(block, **INT4)
    p = QuantizePass()
    p.apply(ctx, p.plan(ctx))
    got, want = block.fc1.quantized_weight(), hqq_quantize_weight(w1, 4, 32)
    assert isinstance(block.fc1, QuantLinear) and (got.group_size, got.num_bits) == (32, 4)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
    assert torch.equal(got.zeros, want.zeros)
    # 0.5 byte + fp16 scale + fp16 zero per 32 weights = 0.625 bytes per weight
    assert got.nbytes() == w1.numel() * 0.625

    block = Block(192, 256)
    block.fc2.weight.data.copy_(w2)
    ctx = _ctx(block, dtype="int8")
    p.apply(ctx, p.plan(ctx))
    got, want = block.fc2.quantized_weight(), quantize_weight(w2, 8, None, symmetric=True)
    assert got.per_channel and got.zeros is None and torch.equal(got.qweight, want.qweight)


@pytest.mark.parametrize("in_features", [200, 48])
def test_in_features_not_divisible_by_32_is_per_channel(in_features: int) -> None:
    torch.manual_seed(1)
    block = Block(in_features, 64)
    w = block.fc1.weight.detach().clone()
    ctx = _ctx(block, **INT4)
    p = QuantizePass()
    actions = p.plan(ctx)
    assert {a.path: a.details["group_size"] for a in actions} == {"fc1": "per-channel", "fc2": 32}
    p.apply(ctx, actions)
    got = block.fc1.quantized_weight()
    assert got.per_channel and not got.symmetric
    assert torch.equal(got.zeros, hqq_quantize_weight(w, 4, in_features).zeros)


@pytest.mark.parametrize("tp, expected", [
    (2, {"fc1": 32, "fc2": 32}),   # column fc1 keeps 576 inputs; row fc2 has 768 per rank
    (4, {"fc1": 32, "fc2": 32}),   # fc2: 384 per rank
])
def test_tensor_parallel_plan_keeps_group_32(tp: int, expected: dict) -> None:
    ctx = _ctx(Block(), tensor_parallel={"tp_size": tp}, **INT4)
    actions = QuantizePass().plan(ctx)
    assert {a.path: a.details["group_size"] for a in actions} == expected
    assert {a.details["method"] for a in actions} == {"hqq"}


def test_tensor_parallel_shards_that_32_does_not_divide() -> None:
    spec = quant_spec_from_config(load_config(None, **INT4))
    assert (spec.num_bits, spec.symmetric, resolve_method(spec.method, 4, spec.symmetric)) == (4, False, "hqq")
    assert plan_group_size(spec, 576, 288) == 32
    assert plan_group_size(spec, 576, 144) == 144  # 576 over 4 ranks: one group per rank's row
    assert plan_group_size(spec, 1000, 500) == 500  # 32 divides neither: per row of the shard
    with pytest.raises(Exception, match="not a multiple of group_size=32"):
        plan_group_size(quant_spec_from_config(load_config(None, quant={"enabled": True, "weight": {
            "num_bits": 4, "group_size": 32}})), 576, 144, "x.o_proj")
