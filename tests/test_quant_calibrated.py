"""Calibrated quantization (gptq, awq): definitions on small problems, the stored format, determinism,
calibration inputs, checkpoints and config validation."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import policyinject as pi
from policyinject.config import ConfigError, load_config
from policyinject.errors import PlanError
from policyinject.kernels.quant_search import gptq_quantize_weight
from policyinject.kernels.quantize import dequantize_weight, quantize_weight
from policyinject.modules.quant_linear import QuantLinear
from policyinject.quant import awq, save_quantized
from policyinject.quant.checkpoint import read_checkpoint
from policyinject.quant.data_source import CalibrationSpec, calibration_rows


def _problem(seed: int, n: int = 48, k: int = 128, t: int = 1024):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels, like real activations
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(t, k, generator=g) @ mix) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return torch.randn(n, k, generator=g), x


def _out_err(x: torch.Tensor, w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((x @ (deq - w).T).norm())


# ---- definitions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, True), (8, 128, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_at_most_rtn(seed, bits, group, symmetric, act_order):
    w, x = _problem(seed)
    qw = gptq_quantize_weight(w, x.T @ x, bits, group, symmetric, act_order=act_order)
    rtn = quantize_weight(w, bits, group, symmetric)
    assert _out_err(x, w, dequantize_weight(qw)) <= _out_err(x, w, dequantize_weight(rtn))


def test_gptq_act_order_keeps_contiguous_groups_and_format():
    w, x = _problem(3)
    qw = gptq_quantize_weight(w, x.T @ x, 4, 32, False, act_order=True)
    rtn = quantize_weight(w, 4, 32, False)
    # same stored format: shapes, dtypes, group size
    for a, b in ((qw.qweight, rtn.qweight), (qw.scales, rtn.scales), (qw.zeros, rtn.zeros)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # static groups: each contiguous group's scale is round-to-nearest's of the original weights
    assert torch.equal(qw.scales, rtn.scales)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_hqq_static_grid(seed):
    """static_grid="hqq": the static groups are HQQ's (scales and zero points), the format is unchanged and
    the output error stays below round-to-nearest's."""
    from policyinject.kernels.quant_search import hqq_quantize_weight

    w, x = _problem(seed)
    qw = gptq_quantize_weight(w, x.T @ x, 4, 32, False, act_order=True, static_grid="hqq")
    grid = hqq_quantize_weight(w, 4, 32)
    assert torch.equal(qw.scales, grid.scales) and torch.equal(qw.zeros, grid.zeros)
    assert qw.qweight.shape == grid.qweight.shape and qw.qweight.dtype == grid.qweight.dtype
    rtn = quantize_weight(w, 4, 32, False)
    assert _out_err(x, w, dequantize_weight(qw)) <= _out_err(x, w, dequantize_weight(rtn))
    with pytest.raises(ValueError, match="static_grid"):
        gptq_quantize_weight(w, x.T @ x, 4, 32, False, static_grid="best")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (4, 128, True)])
def test_awq_output_error_at_most_rtn(seed, bits, group, symmetric):
    w, x = _problem(seed)
    s = awq.search_scales(x, [w], bits, group, symmetric)
    qw = awq.awq_quantize_weight(w * s, x / s, bits, group, symmetric)
    deq = dequantize_weight(qw) / s  # the fold: x / s into W s
    rtn = quantize_weight(w, bits, group, symmetric)
    assert _out_err(x, w, deq) <= _out_err(x, w, dequantize_weight(rtn))


def test_awq_clip_never_worse_per_group():
    w, x = _problem(4)
    wc = awq.search_clip(w, x, 4, 32, False)
    d_clip = (w - dequantize_weight(quantize_weight(wc, 4, 32, False))).reshape(w.shape[0], -1, 32)
    d_rtn = (w - dequantize_weight(quantize_weight(w, 4, 32, False))).reshape(w.shape[0], -1, 32)
    xg = x.reshape(x.shape[0], -1, 32)
    err = lambda d: torch.einsum("tgi,ngi->tng", xg, d).pow(2).sum(0)
    assert bool((err(d_clip) <= err(d_rtn) * (1 + 1e-5) + 1e-6).all())


# ---- a tiny Llama end to end ------------------------------------------------------------------------------
def _tiny_llama(seed: int = 0, kv_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(seed: int = 0, rows: int = 4, seq: int = 48) -> list:
    return [torch.randint(0, 96, (rows, seq), generator=torch.Generator().manual_seed(seed))]


def _quant(method: str, data=None, **cal) -> dict:
    return {"enabled": True, "weight": {"num_bits": 4, "method": method, "group_size": 32},
            "calibration": {"data": _tokens() if data is None else data, "num_samples": 4, "seq_len": 48, **cal}}


def _init(model, quant) -> torch.nn.Module:
    return pi.init_inference(model, dtype="fp32", kernel_backend="torch", quant=quant).module


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_model_quantizes_to_quantlinears_and_beats_rtn(method):
    base = _tiny_llama(kv_heads=4)  # MHA: o_proj gets scales folded into v_proj under awq
    ids = _tokens(seed=1, rows=1)[0]
    with torch.inference_mode():
        ref = base(ids).logits
    model = _init(copy.deepcopy(base), _quant(method))
    rtn = _init(copy.deepcopy(base), {"enabled": True, "weight": {"num_bits": 4, "method": "rtn", "group_size": 32}})
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    with torch.inference_mode():
        err = float((model(ids).logits - ref).norm())
        err_rtn = float((rtn(ids).logits - ref).norm())
    assert err == err and err < err_rtn


def test_gptq_grid_key_reaches_gptq():
    """quant.calibration.gptq_grid="hqq": every calibrated linear's zero points are HQQ's of its original
    weight (the static groups); "minmax" differs; a value outside the two is a ConfigError naming the key."""
    from policyinject.kernels.quant_search import hqq_quantize_weight

    base = _tiny_llama()
    w0 = base.model.layers[0].mlp.down_proj.weight.detach().clone()
    weight = {"num_bits": 4, "method": "gptq", "group_size": 32, "q_type": "asymmetric"}
    hqq = _init(copy.deepcopy(base), {**_quant("gptq", gptq_grid="hqq"), "weight": weight})
    minmax = _init(copy.deepcopy(base), {**_quant("gptq"), "weight": weight})
    grid = hqq_quantize_weight(w0, 4, 32)
    assert torch.equal(hqq.model.layers[0].mlp.down_proj.zeros.float(), grid.zeros.float())
    assert not torch.equal(minmax.model.layers[0].mlp.down_proj.zeros.float(), grid.zeros.float())
    with pytest.raises(ConfigError, match="gptq_grid"):
        load_config(quant={"calibration": {"gptq_grid": "best"}})


def test_gptq_damp_key_reaches_gptq():
    """quant.calibration.damp changes the result (0.1 is the default) and must be a finite number > 0."""
    base = _tiny_llama()
    a = _init(copy.deepcopy(base), _quant("gptq"))
    b = _init(copy.deepcopy(base), _quant("gptq", damp=0.1))
    c = _init(copy.deepcopy(base), _quant("gptq", damp=2.0))
    qa, qb, qc = (m.model.layers[1].mlp.down_proj.qweight for m in (a, b, c))
    assert torch.equal(qa, qb) and not torch.equal(qa, qc)
    for bad in (0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ConfigError, match="damp"):
            load_config(quant={"calibration": {"damp": bad}})


def test_calibrated_weights_dequantize_through_quantlinear():
    """Kernel-format equality: a calibrated linear is a QuantLinear whose output is x @ dequantize(stored)^T."""
    model = _init(_tiny_llama(), _quant("gptq"))
    ql = model.model.layers[1].mlp.gate_proj
    x = torch.randn(5, ql.in_features)
    from policyinject.kernels.quantize import QuantizedWeight

    qw = QuantizedWeight(ql.qweight, ql.scales, ql.zeros, ql.num_bits, ql.group_size, ql.in_features,
                         ql.out_features)
    ref = x @ dequantize_weight(qw).T
    with torch.inference_mode():
        out = ql(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert ql.qweight.dtype == torch.uint8 and ql.scales.dtype == torch.float16 and ql.zeros.dtype == torch.float16


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibration_is_deterministic(method):
    a = _init(_tiny_llama(), _quant(method))
    b = _init(_tiny_llama(), _quant(method))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_awq_folds_into_norm_and_records_it():
    base = _tiny_llama()
    model = _init(copy.deepcopy(base), _quant("awq"))
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, base.model.layers[0].input_layernorm.weight)  # scales were folded
    rec = model._policyinject_quant_record
    assert "model.layers.0.input_layernorm.weight" in rec.folded
    assert "model.layers.0.mlp.up_proj.weight" not in rec.folded  # a quantized linear: in its QuantLinear


# ---- calibration inputs ---------------------------------------------------------------------------------
def _char_tok(text):
    return {"input_ids": torch.tensor([[ord(c) % 96 for c in text]])}


def test_calibration_input_forms(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("the quick brown fox jumps over the lazy dog " * 40, encoding="utf-8")
    from_file = calibration_rows(CalibrationSpec(data=str(f), num_samples=3, seq_len=32, tokenizer=_char_tok))
    default = calibration_rows(CalibrationSpec(num_samples=2, seq_len=64, tokenizer=_char_tok))
    tensors = calibration_rows(CalibrationSpec(data=[torch.arange(40), torch.arange(80).reshape(2, 40)],
                                               num_samples=3, seq_len=32))

    def batches():
        yield torch.ones(2, 20, dtype=torch.long)
        yield torch.zeros(5, 20, dtype=torch.long)

    from_callable = calibration_rows(CalibrationSpec(data=batches, num_samples=3, seq_len=32))
    assert [tuple(r.shape) for r in from_file] == [(1, 32)] * 3
    assert [tuple(r.shape) for r in default] == [(1, 64)] * 2
    assert [tuple(r.shape) for r in tensors] == [(1, 32)] * 3 and torch.equal(tensors[2][0], torch.arange(40, 72))
    assert [float(r.sum()) for r in from_callable] == [20.0, 20.0, 0.0]
    # seeded: same seed same windows, another seed others
    again = calibration_rows(CalibrationSpec(data=str(f), num_samples=3, seq_len=32, tokenizer=_char_tok))
    other = calibration_rows(CalibrationSpec(data=str(f), num_samples=3, seq_len=32, seed=7, tokenizer=_char_tok,))
    assert all(torch.equal(a, b) for a, b in zip(from_file, again))
    assert not all(torch.equal(a, b) for a, b in zip(default, calibration_rows(
        CalibrationSpec(num_samples=2, seq_len=64, seed=5, tokenizer=_char_tok))))
    assert other is not None


def test_text_without_tokenizer_is_a_plan_error_naming_the_key():
    with pytest.raises(PlanError, match="quant.calibration.tokenizer"):
        _init(_tiny_llama(), {"enabled": True, "weight": {"num_bits": 4, "method": "gptq"}})


def test_callable_calibration_input_end_to_end():
    def batches():
        yield from _tokens()

    model = _init(_tiny_llama(), _quant("gptq", data=batches))
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


# ---- checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_save_load_round_trip_bit_identical(tmp_path, method):
    base = _tiny_llama()
    path = tmp_path / "q.safetensors"
    first = pi.init_inference(copy.deepcopy(base), dtype="fp32", kernel_backend="torch", quant=_quant(method))
    save_quantized(first, path)
    loaded = _init(copy.deepcopy(base), {**_quant(method), "checkpoint": str(path)})
    sa, sb = first.module.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = _tokens(seed=2, rows=1)[0]
    with torch.inference_mode():
        assert torch.equal(first.module(ids).logits, loaded(ids).logits)
    ckpt = read_checkpoint(path)
    assert ckpt.fingerprint["quant.weight.method"] == method and ckpt.model_class == "LlamaForCausalLM"


def test_load_with_mismatched_config_names_the_keys(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quantized(pi.init_inference(_tiny_llama(), dtype="fp32", kernel_backend="torch", quant=_quant("gptq")), path)
    bad = _quant("gptq", seed=3)
    bad["weight"]["group_size"] = 64
    bad["checkpoint"] = str(path)
    with pytest.raises(PlanError) as info:
        _init(_tiny_llama(), bad)
    msg = str(info.value)
    assert "quant.weight.group_size: file 32, config 64" in msg and "quant.calibration.seed: file 0, config 3" in msg


def test_load_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        _init(_tiny_llama(), {**_quant("gptq"), "checkpoint": str(tmp_path / "nope.safetensors")})


def test_rtn_models_save_and_load_too(tmp_path):
    path = tmp_path / "q.safetensors"
    quant = {"enabled": True, "weight": {"num_bits": 8}}
    first = pi.init_inference(_tiny_llama(), dtype="fp32", kernel_backend="torch", quant=quant)
    save_quantized(first, path)
    loaded = _init(_tiny_llama(), {**quant, "checkpoint": str(path)})
    assert torch.equal(first.module.model.layers[0].mlp.up_proj.qweight, loaded.model.layers[0].mlp.up_proj.qweight)


# ---- config -----------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(num_samples=st.integers(-3, 5000), seq_len=st.integers(-3, 5000), seed=st.integers(-3, 2 ** 31))
def test_calibration_integer_keys(num_samples, seq_len, seed):
    cal = {"num_samples": num_samples, "seq_len": seq_len, "seed": seed}
    bad = [k for k, lo in (("num_samples", 1), ("seq_len", 2), ("seed", 0)) if cal[k] < lo]
    if bad:
        with pytest.raises(ConfigError) as info:
            load_config(quant={"calibration": cal})
        assert all(f"quant.calibration.{k}" in str(info.value) for k in bad)
    else:
        c = load_config(quant={"calibration": cal}).quant.calibration
        assert (c.num_samples, c.seq_len, c.seed) == (num_samples, seq_len, seed)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.just([]),
                 st.lists(st.just(torch.ones(3)), min_size=1, max_size=2)))
def test_calibration_data_rejects_non_inputs(value):
    with pytest.raises(ConfigError, match="quant.calibration.data"):
        load_config(quant={"calibration": {"data": value}})


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_method_accepts_calibrated_values(method):
    assert load_config(quant={"weight": {"method": method}}).quant.weight.method == method


def test_method_typo_hints():
    with pytest.raises(ConfigError, match='did you mean "gptq"'):
        load_config(quant={"weight": {"method": "gtpq"}})


def test_tokenizer_and_checkpoint_keys():
    assert load_config(quant={"calibration": {"tokenizer": _char_tok}}).quant.calibration.tokenizer is _char_tok
    with pytest.raises(ConfigError, match="quant.calibration.tokenizer"):
        load_config(quant={"calibration": {"tokenizer": 3}})
    assert load_config(quant={"checkpoint": "a.safetensors"}).quant.checkpoint == "a.safetensors"
    d = load_config(quant={"calibration": {"data": [torch.arange(3)]}}).to_dict()["quant"]["calibration"]
    assert "data" not in d and d["num_samples"] == 8  # a live value has no JSON form: left out, not mangled


@pytest.mark.parametrize("weight,cal,key", [
    ({"method": "awq"}, {"damp": 0.2}, "quant.calibration.damp"),
    ({"method": "rtn"}, {"gptq_grid": "hqq"}, "quant.calibration.gptq_grid"),
    ({"method": "gptq"}, {"gptq_grid": "hqq", "act_order": False}, "quant.calibration.gptq_grid"),
    ({"method": "gptq", "q_type": "symmetric"}, {"gptq_grid": "hqq"}, "quant.calibration.gptq_grid"),
])
def test_gptq_only_keys_warn_where_they_do_nothing(weight, cal, key):
    """Loud or right: a GPTQ-only key that cannot act is named in a warning, not dropped silently."""
    with pytest.warns(UserWarning, match=key.replace(".", r"\.") + ".*has no effect"):
        load_config(quant={"enabled": True, "weight": {"num_bits": 4, **weight}, "calibration": cal})


def test_gptq_only_keys_do_not_warn_where_they_act():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(quant={"enabled": True, "weight": {"num_bits": 4, "method": "gptq"},
                           "calibration": {"gptq_grid": "hqq", "damp": 0.2}})
