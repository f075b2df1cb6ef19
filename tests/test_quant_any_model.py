"""Weight-only quantization of models no policy knows (as torchao's ``quantize_``): every ``nn.Linear`` and HF
``Conv1D`` except the output head; ``quant.weight.include`` / ``exclude`` patterns on top of any selection;
hostile patterns rejected at config time; a plan that quantizes nothing warns."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from pi_testing import rel_err
from torch import nn

import policyinject as pi
from policyinject.modules.quant_linear import QuantLinear


class MLP(nn.Module):
    """A plain MLP classifier with an HF ``Conv1D`` in the middle (GPT-2-style ``[in, out]`` weight)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.inp = nn.Linear(64, 128)
        self.mid = Conv1D(128, 128)  # nf=128 outputs, nx=128 inputs
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


def _mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.mid.weight.normal_(0, 0.05)
    return model


def _gptj():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTJConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPTJForCausalLM(cfg).eval()


GPTJ_LINEARS = [f"transformer.h.{i}.{n}" for i in range(2)
                for n in ("attn.k_proj", "attn.v_proj", "attn.q_proj", "attn.out_proj", "mlp.fc_in", "mlp.fc_out")]


def _quant(bits: int, **weight) -> dict:
    return {"enabled": True, "weight": {"num_bits": bits, **weight}}


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.08)])
def test_custom_mlp_quantizes_every_linear_but_the_head(bits, tol):
    model = _mlp()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    engine = pi.init_inference(model, dtype="fp32", kernel_backend="torch", quant=_quant(bits))
    summary = engine.plan.quantize
    assert summary.quantized == ("inp", "mid") and summary.linears == 2 and summary.bits == bits
    assert list(summary.skipped) == ["out"] and "output head" in summary.skipped["out"]
    assert isinstance(model.inp, QuantLinear) and isinstance(model.mid, QuantLinear) and type(model.out) is nn.Linear
    with torch.no_grad():
        assert rel_err(engine(x), ref(x)) < tol


@pytest.mark.parametrize("bits, tol", [(8, 0.02), (4, 0.15)])
def test_unknown_transformers_model_quantizes_every_linear_but_lm_head(bits, tol):
    model = _gptj()
    ref = copy.deepcopy(model)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    engine = pi.init_inference(model, dtype="fp32", kernel_backend="torch", quant=_quant(bits))
    summary = engine.plan.quantize
    assert list(summary.quantized) == GPTJ_LINEARS
    assert list(summary.skipped) == ["lm_head"] and "output embeddings" in summary.skipped["lm_head"]
    assert all(isinstance(model.get_submodule(p), QuantLinear) for p in GPTJ_LINEARS)
    assert type(model.lm_head) is nn.Linear
    assert "linears not quantized" in engine.plan.summary
    with torch.no_grad():
        assert rel_err(engine(ids).logits, ref(ids).logits) < tol


def test_head_quantized_on_request_in_an_unknown_model():
    model = _gptj()
    engine = pi.init_inference(model, dtype="fp32", kernel_backend="torch",
                               quant={**_quant(8), "lm_head": {"enabled": True}})
    assert engine.plan.quantize.quantized[-1] == "lm_head" and not engine.plan.quantize.skipped
    assert isinstance(model.lm_head, QuantLinear)


def test_include_and_exclude_patterns_on_an_unknown_model():
    plan = pi.plan_inference(_gptj(), dtype="fp32", quant=_quant(8, include=["*.mlp.*"]))
    assert list(plan.quantize.quantized) == [p for p in GPTJ_LINEARS if ".mlp." in p]
    assert plan.quantize.skipped["transformer.h.0.attn.q_proj"] == "matches no quant.weight.include pattern"
    plan = pi.plan_inference(_gptj(), dtype="fp32", quant=_quant(8, exclude=["re:.*\\.attn\\.(q|k|v)_proj"]))
    assert list(plan.quantize.quantized) == [p for p in GPTJ_LINEARS if not p.endswith(("q_proj", "k_proj", "v_proj"))]
    keep = {a.path: a.details["reason"] for a in plan.for_pass("quantize") if a.action == "keep"}
    assert keep["transformer.h.1.attn.v_proj"] == "matches quant.weight.exclude pattern 're:.*\\\\.attn\\\\.(q|k|v)_proj'"


def test_patterns_apply_on_top_of_a_known_models_policy():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    default = pi.plan_inference(model, dtype="int8")
    assert default.quantize.linears == 14 and default.quantize.skipped == {
        "lm_head": "the output head (the model policy's lm_head), kept unless quant.lm_head.enabled"}
    excluded = pi.plan_inference(model, dtype="int8", quant={"weight": {"exclude": "*.down_proj"}})
    assert excluded.quantize.linears == 12 and all(not p.endswith("down_proj") for p in excluded.quantize.quantized)
    only = pi.plan_inference(model, dtype="int8", quant={"weight": {"include": "re:model\\.layers\\.0\\..*"}})
    assert only.quantize.linears == 7 and all(p.startswith("model.layers.0.") for p in only.quantize.quantized)


def test_include_matching_nothing_is_a_plan_error_and_unused_exclude_warns():
    with pytest.raises(pi.PlanError, match=r"quant\.weight\.include: '\*\.nothing' match no linear of GPTJForCausalLM"):
        pi.plan_inference(_gptj(), dtype="fp32", quant=_quant(8, include=["*.mlp.*", "*.nothing"]))
    with pytest.warns(UserWarning, match=r"quant\.weight\.exclude: 'nope\.\*' matches no linear"):
        plan = pi.plan_inference(_gptj(), dtype="fp32", quant=_quant(8, exclude="nope.*"))
    assert plan.quantize.linears == 12


def test_nothing_quantized_warns_naming_the_class_and_patterns():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(pi.NothingQuantizedWarning, match=r"nothing in MLP is quantized.*exclude=\('\*',\)"):
        engine = pi.init_inference(model, dtype="fp32", kernel_backend="torch", quant=_quant(8, exclude="*"))
    assert engine.plan.quantize.linears == 0 and len(engine.plan.quantize.skipped) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(pi.NothingQuantizedWarning, match=r"nothing in Sequential is quantized: the model has no linear"):
        pi.init_inference(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()), dtype="int8")
    assert issubclass(pi.NothingQuantizedWarning, UserWarning)


def test_a_quantized_plan_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", pi.NothingQuantizedWarning)
        pi.plan_inference(_mlp(), dtype="int8")


@pytest.mark.parametrize("key, value, message", [
    ("include", ["re:(a+)+$"], r"quant\.weight\.include\[0\]: the regex .* nests a quantifier"),
    ("exclude", ["re:(x|xx)*y"], r"quant\.weight\.exclude\[0\]: the regex .* nests a quantifier or an alternation"),
    ("exclude", ["re:.*a.*b.*c.*d.*e"], r"quant\.weight\.exclude\[0\]: .*more than 4 unbounded repeats"),
    ("include", ["re:(a)\\1"], r"quant\.weight\.include\[0\]: .*back-reference"),
    ("include", ["re:(["], r"quant\.weight\.include\[0\]: the regex .* does not compile"),
    ("include", ["ok", "bad\x00"], r"quant\.weight\.include\[1\]: a pattern cannot contain control characters"),
    ("exclude", ["x" * 300], r"quant\.weight\.exclude\[0\]: a pattern is at most 256 characters"),
    ("exclude", ["p"] * 300, r"quant\.weight\.exclude: at most 256 patterns"),
    ("include", [5], r"quant\.weight\.include\[0\]: a pattern must be a string"),
    ("include", [], r"quant\.weight\.include: expected at least one pattern"),
    ("exclude", {"a": 1}, r"quant\.weight\.exclude: expected a pattern string or a list"),
    ("include", "", r"quant\.weight\.include: a pattern cannot be empty"),
])
def test_hostile_patterns_are_config_errors_naming_the_key(key, value, message):
    with pytest.raises(pi.ConfigError, match=message):
        pi.load_config({"quant": {"enabled": True, "weight": {key: value}}})


def test_routed_experts_left_in_float_are_a_lint_line_unless_the_moe_block_is_injected():
    from policyinject.passes.quantize import EXPERTS_STAY_FLOAT
    from policyinject.testing.coverage import tiny_causal_lm

    model = tiny_causal_lm("mixtral")  # experts as 3-D parameters (MixtralExperts), not nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = pi.plan_inference(model, dtype="int8")
        injected = pi.plan_inference(model, dtype="int8", replace_with_kernel_inject=True)
    lines = [ln for ln in plain.lint if ln.startswith(EXPERTS_STAY_FLOAT)]
    assert len(lines) == 1 and "2 modules" in lines[0] and "model.layers.0.mlp.experts" in lines[0], plain.lint
    assert "gate_up_proj" in lines[0] and "Policy.moe" in lines[0]
    # the attention linears are still quantized; the injected MoE block quantizes its experts itself
    assert plain.quantize.linears == 8
    assert not [ln for ln in injected.lint if ln.startswith(EXPERTS_STAY_FLOAT)], injected.lint
    moe = [a.details["moe"] for a in injected.for_pass("kernel_inject") if "moe" in a.details]
    assert len(moe) == 2 and all(m["experts_quant"].startswith("int8") for m in moe)
