"""The quantize pass: plan without mutating, apply per config, qkv switch, summary, TP wrappers, end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from policyinject.config import load_config
from policyinject.errors import PlanError
from policyinject.modules.quant_linear import QuantLinear
from policyinject.modules.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from policyinject.passes.base import PassContext, ResolvedLayer
from policyinject.passes.quantize import QuantizePass, QuantSpec, plan_group_size, quantize_linear
from policyinject.policy import AttentionSpec, MLPSpec, Policy


class Attn(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h // 3), nn.Linear(h, h // 3)
        self.o_proj = nn.Linear(h, h, bias=False)


class MLP(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, h: int = 576, i: int = 1536) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attn(h), MLP(h, i)

    def forward(self, x):
        a = self.self_attn
        return x + a.o_proj(a.q_proj(x)) + self.mlp(x)


class Model(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 576)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.lm_head = nn.Linear(576, 32, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


POLICY = Policy(
    Block,
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj"),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
)


def _ctx(model: Model, **config) -> PassContext:
    cfg = load_config(None, **config)
    layers = [ResolvedLayer(f"layers.{i}", layer, POLICY) for i, layer in enumerate(model.layers)]
    return PassContext(model=model, config=cfg, layers=layers, device=torch.device("cpu"))


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_plan_does_not_mutate_and_apply_quantizes() -> None:
    torch.manual_seed(0)
    model = Model()
    ids = torch.randint(0, 32, (2, 5))
    ref = model(ids).detach()
    before = _state(model)
    ctx = _ctx(model, dtype="int8")
    p = QuantizePass()
    assert p.enabled(ctx.config)
    actions = p.plan(ctx)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, nn.Linear) for m in model.modules() if m is not model and hasattr(m, "weight")
               and not isinstance(m, nn.Embedding))
    quant = [a for a in actions if a.action == "quantize"]
    assert len(quant) == 14
    a = next(a for a in quant if a.path == "layers.0.mlp.down_proj")
    assert a.details == {"bits": 8, "group_size": "per-channel", "symmetric": True, "method": "rtn",
                         "bytes_before": 576 * 1536 * 4, "bytes_after": 576 * 1536 + 576 * 2}
    p.apply(ctx, actions)
    assert isinstance(model.layers[1].self_attn.q_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
    summary = ctx.plan.quantize
    assert not summary.planned and summary.linears == 14
    assert summary.model_bytes_after < 0.4 * summary.model_bytes_before
    out = model(ids).detach()
    assert ((out - ref).norm() / ref.norm()) < 0.02


def test_int4_groups_asymmetric_and_qkv_switch() -> None:
    model = Model(1)
    ctx = _ctx(model, quant={"enabled": True, "weight": {"num_bits": 4, "q_type": "asymmetric"},
                             "qkv": {"enabled": False}})
    p = QuantizePass()
    actions = p.plan(ctx)
    kept = {a.path for a in actions if a.action == "keep"}
    assert kept == {f"layers.0.self_attn.{n}_proj" for n in "qkv"}
    groups = {a.path.rsplit(".", 1)[-1]: a.details["group_size"] for a in actions if a.action == "quantize"}
    assert groups == {"o_proj": 32, "gate_proj": 32, "up_proj": 32, "down_proj": 32}  # the int4 default group
    p.apply(ctx, actions)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    down = model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.num_bits == 4 and not down.symmetric


def test_q_groups_and_group_size_mapping() -> None:
    model = Model(1)
    actions = QuantizePass().plan(_ctx(model, quant={"enabled": True, "weight": {"num_bits": 8, "q_groups": 3}}))
    groups = {a.path.rsplit(".", 1)[-1]: a.details["group_size"] for a in actions}
    assert groups["q_proj"] == 192 and groups["down_proj"] == 512
    actions = QuantizePass().plan(_ctx(model, quant={"enabled": True, "weight": {"num_bits": 4, "group_size": 32}}))
    assert {a.details["group_size"] for a in actions} == {32}


def test_bad_group_is_a_plan_error_naming_the_module() -> None:
    model = Model(1)
    with pytest.raises(PlanError, match=r"layers.0.self_attn.q_proj in_features=576 is not divisible by q_groups=5"):
        QuantizePass().plan(_ctx(model, quant={"enabled": True, "weight": {"q_groups": 5}}))


def test_plan_group_size_respects_tp_shards() -> None:
    assert plan_group_size(QuantSpec(num_bits=4), 576, 288) == 32
    assert plan_group_size(QuantSpec(num_bits=4), 14336, 7168) == 32
    assert plan_group_size(QuantSpec(num_bits=4), 576, 144) == 144  # 32 does not divide the shard: one group each
    with pytest.raises(PlanError, match="not a multiple of group_size=64"):
        plan_group_size(QuantSpec(num_bits=4, group_size=64), 576, 288, "x.o_proj")


def test_quantize_linear_on_tensor_parallel_wrappers() -> None:
    full = nn.Linear(128, 32)
    x = torch.randn(3, 128)
    col = ColumnParallelLinear.from_linear(full, rows=range(0, 16))
    q = quantize_linear(col, 8, None, True, "torch")
    # a new wrapper: the one passed in is unchanged (apply builds a replacement before swapping it in)
    assert q is not col and isinstance(q.local, QuantLinear) and type(col.local) is nn.Linear
    assert ((q(x) - full(x)[:, :16]).norm() / full(x)[:, :16].norm()) < 0.01
    row = RowParallelLinear.from_linear(full, cols=range(64, 128))
    row = quantize_linear(row, 4, 32, True, "torch")
    assert isinstance(row.local, QuantLinear) and row.local.in_features == 64 and row.bias is not None
    ref = x[:, 64:] @ full.weight[:, 64:].t() + full.bias
    assert ((row(x[:, 64:]) - ref).norm() / ref.norm()) < 0.15
    fused = ColumnParallelLinear.cat([q, quantize_linear(ColumnParallelLinear.from_linear(full, rows=range(16, 32)),
                                                           8, None, True, "torch")])
    assert isinstance(fused.local, QuantLinear) and fused.out_features == 32


def test_enabled_follows_config() -> None:
    p = QuantizePass()
    assert not p.enabled(load_config(None))
    assert p.enabled(load_config(None, dtype="int8"))
    assert p.enabled(load_config(None, quant={"enabled": True}))


@pytest.mark.slow
def test_end_to_end_tiny_llama_int8() -> None:
    transformers = pytest.importorskip("transformers")
    from policyinject.pipeline import init_inference

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    engine = init_inference(model, dtype="int8")
    assert len(engine.plan.for_pass("quantize")) == 14
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_quantized_on_request(tied: bool, bits: int) -> None:
    """quant.lm_head.enabled quantizes the head (kept 16-bit by default); a tied head gets its own copy and the
    embedding keeps its tensor; logits stay close to the original's."""
    transformers = pytest.importorskip("transformers")
    from policyinject.pipeline import init_inference

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=160, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 160, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    default = init_inference(copy.deepcopy(model), quant={"enabled": True, "weight": {"num_bits": bits}})
    assert not any(a.path == "lm_head" for a in default.plan.for_pass("quantize"))
    embed_weight = model.model.embed_tokens.weight
    engine = init_inference(model, quant={"enabled": True, "weight": {"num_bits": bits}, "lm_head": {"enabled": True}})
    head = [a for a in engine.plan.for_pass("quantize") if a.path == "lm_head"]
    assert len(head) == 1 and head[0].action == "quantize" and head[0].details["tied_to_embedding"] is tied
    assert head[0].details["bytes_freed"] == (0 if tied else 160 * 64 * 4)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.num_bits == bits
    assert model.model.embed_tokens.weight is embed_weight and embed_weight.dtype == torch.float32
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()) < (0.03 if bits == 8 else 0.3)
