"""Sources (None, mapping, JSON/YAML path, InferenceConfig), merging with kwargs, to_dict and round trips."""

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from policyinject.config import (
    ConfigError,
    InferenceConfig,
    LoadResult,
    Problem,
    load_config,
    parse_config,
    resolve_dtype,
)
from policyinject.config.class_ref import ClassRef
from policyinject.policy import AttentionSpec, Policy

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "ds_inference_config.json"


def test_none_gives_defaults():
    assert load_config() == load_config(None) == load_config({}) == InferenceConfig()


def test_json_and_yaml_files(tmp_path):
    data = {"tp": {"tp_size": 2}, "dtype": "bf16", "max_tokens": 512}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("tp:\n  tp_size: 2\ndtype: bf16\nmax_tokens: 512\n")
    (tmp_path / "c.yml").write_text("{tp: {tp_size: 2}, dtype: bf16, max_tokens: 512}\n")
    expected = load_config(data)
    assert load_config(tmp_path / "c.json") == expected
    assert load_config(str(tmp_path / "c.yaml")) == expected
    assert load_config(tmp_path / "c.yml") == expected
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == InferenceConfig()


@pytest.mark.parametrize("name,content,needle", [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.yaml", "a: [1,\n", "not valid YAML"),
    ("list.json", "[1, 2]", "expected a mapping at the top level"),
    ("c.toml", "a = 1", "expected a .json, .yaml or .yml file"),
])
def test_bad_files(tmp_path, name, content, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / name)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/no/such/config.json")


@pytest.mark.parametrize("bad", [3, [("tp", 2)], b"{}", object()])
def test_bad_config_argument(bad):
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.problems[0].path == "config"


def test_example_config_loads_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning) as record:
        cfg = load_config(EXAMPLE)
    assert sorted(str(w.message).split("`")[1] for w in record) == ["mp_size", "replace_method"]
    assert cfg.tensor_parallel.tp_size == 2 and cfg.replace_with_kernel_inject and cfg.dtype == "fp16"
    assert cfg.max_out_tokens == 2048
    # the class name is kept as written (never imported) and matched against the model at plan time
    assert cfg.injection_policy == {ClassRef("torch.nn.TransformerDecoderLayer"): (
        "linear2", "self_attn.out_proj", "multihead_attn.out_proj")}


# -- merging ---------------------------------------------------------------------------------------

def test_kwargs_merge_into_config():
    cfg = load_config({"tp": {"tp_size": 2}}, tensor_parallel={"tp_grain_size": 32}, dtype="fp16")
    assert (cfg.tensor_parallel.tp_size, cfg.tensor_parallel.tp_grain_size, cfg.dtype) == (2, 32, "fp16")


def test_same_value_in_both_is_fine():
    assert load_config({"dtype": "fp16"}, dtype=torch.float16).dtype == "fp16"
    assert load_config({"max_tokens": 9}, max_out_tokens=9).max_out_tokens == 9


def test_different_values_conflict():
    with pytest.raises(ConfigError) as e:
        load_config({"dtype": "fp16", "tp": {"tp_size": 2}}, dtype="bf16", tensor_parallel={"tp_size": 4})
    assert e.value.problems == [
        Problem("dtype", "the keyword arguments give 'bf16', but the config gives 'fp16'"),
        Problem("tensor_parallel.tp_size", "the keyword arguments give 4, but the config gives 2 (as `tp.tp_size`)"),
    ]


def test_conflict_with_file_names_the_file(tmp_path):
    (tmp_path / "c.json").write_text('{"max_tokens": 5}')
    with pytest.raises(ConfigError, match=r"config file '.*c\.json' gives 5 \(as `max_tokens`\)"):
        load_config(tmp_path / "c.json", max_out_tokens=6)


def test_inference_config_source():
    base = load_config(tp={"tp_size": 2}, dtype="bf16")
    assert load_config(base) == base
    assert load_config(base, max_out_tokens=64) == load_config(tp={"tp_size": 2}, dtype="bf16", max_out_tokens=64)
    assert load_config(base, dtype="bf16") == base
    with pytest.raises(ConfigError, match="the InferenceConfig gives 'bf16'"):
        load_config(base, dtype="fp16")
    assert load_config(InferenceConfig(), dtype="fp16").dtype == "fp16"  # defaults do not count as given


def test_merge_rules_apply_across_sources():
    with pytest.raises(ConfigError, match="min_out_tokens"):
        load_config({"min_out_tokens": 9}, max_out_tokens=8)


def test_objects_in_kwargs_compare_by_identity():
    class Group:
        pass

    g = Group()
    assert load_config({"tp": {"tp_group": g}}, tensor_parallel={"tp_group": g}).tensor_parallel.tp_group is g
    with pytest.raises(ConfigError):
        load_config({"tp": {"tp_group": g}}, tensor_parallel={"tp_group": Group()})


@pytest.mark.filterwarnings("ignore:.*is ignored here:UserWarning")
def test_tensor_values_do_not_break_comparison():
    with pytest.raises(ConfigError):
        load_config({"zero": {"x": torch.ones(2)}}, zero={"x": torch.ones(2)})


# -- results, warnings -----------------------------------------------------------------------------

def test_parse_config_returns_warnings_without_emitting():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = parse_config({"mp_size": 2, "use_triton": True})
    assert isinstance(result, LoadResult)
    assert [w.category for w in result.warnings] == [DeprecationWarning, UserWarning]
    assert [w.path for w in result.warnings] == ["mp_size", "use_triton"]


def test_config_error_carries_warnings_and_pickles():
    with pytest.raises(ConfigError) as e:
        parse_config({"mp_size": 0})
    assert [w.path for w in e.value.warnings] == ["mp_size"]
    again = pickle.loads(pickle.dumps(e.value))
    assert again.problems == e.value.problems and str(again) == str(e.value)


def test_load_config_emits_warnings_even_on_error():
    with pytest.warns(DeprecationWarning, match="mp_size"), pytest.raises(ConfigError):
        load_config(mp_size=0)


# -- to_dict -----------------------------------------------------------------------------------------

def test_to_dict_is_canonical_json():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(EXAMPLE)
    d = cfg.to_dict()
    json.dumps(d)
    assert d["dtype"] == "fp16" and d["tensor_parallel"]["tp_size"] == 2
    assert d["injection_policy"] == {"torch.nn.TransformerDecoderLayer": [
        "linear2", "self_attn.out_proj", "multihead_attn.out_proj"]}
    assert "kernel_inject" not in d and "mp_size" not in d and "replace_method" not in d
    assert load_config(d) == cfg


@pytest.mark.parametrize("dtype,name", [
    (torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.int8, "int8"), ("auto", "auto"),
])
def test_to_dict_dtype_short_names(dtype, name):
    assert load_config(dtype=dtype).to_dict()["dtype"] == name


def test_to_dict_omits_live_objects():
    class Mpu:
        def get_model_parallel_group(self):
            return None

    class Block(torch.nn.Module):
        pass

    class HFConfig:
        def to_dict(self):
            return {}

    policy = Policy(layer=Block, attention=AttentionSpec(q="q", k="k", v="v"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(tp={"mpu": Mpu(), "tp_group": object()}, moe={"ep_group": object()},
                          injection_policy={Block: policy, torch.nn.TransformerEncoderLayer: "linear2"},
                          args=HFConfig(), zero={"dtype": torch.float16, "obj": object()})
    d = cfg.to_dict()
    json.dumps(d)
    assert "mpu" not in d["tensor_parallel"] and "tp_group" not in d["tensor_parallel"]
    assert "ep_group" not in d["moe"] and d["moe"]["ep_mp_group"] is None
    assert d["injection_policy"] == {"torch.nn.modules.transformer.TransformerEncoderLayer": ["linear2"]}
    assert "config" not in d
    assert d["zero"] == {"dtype": "torch.float16"}


def test_equality_and_evolve():
    import attrs

    a = load_config(dtype="bf16", tp={"tp_size": 2})
    assert a == load_config(dtype=torch.bfloat16, tensor_parallel={"tp_size": 2})
    assert a != load_config(dtype="fp16", tp={"tp_size": 2})
    b = attrs.evolve(a, max_out_tokens=8)
    assert b.max_out_tokens == 8 and b.dtype == "bf16"
    with pytest.raises(ConfigError):  # evolve re-runs the cross-field rules
        attrs.evolve(a, min_out_tokens=2048)


# -- dtype resolution ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,model,device,bf16,expected", [
    ("auto", torch.float16, "cuda", True, torch.float16),
    ("auto", torch.bfloat16, "cuda", False, torch.bfloat16),
    ("auto", torch.float32, "cuda", True, torch.bfloat16),
    ("auto", torch.float32, "cuda:1", False, torch.float16),
    ("auto", torch.float32, "cpu", None, torch.float32),
    ("auto", torch.bfloat16, "cpu", None, torch.bfloat16),
    ("int8", torch.float32, "cpu", None, torch.float32),
    ("int8", torch.float32, "cuda", True, torch.bfloat16),
    ("fp16", torch.float32, "cpu", None, torch.float16),
    ("fp32", torch.bfloat16, "cuda", True, torch.float32),
    ("bf16", torch.float16, "cpu", None, torch.bfloat16),
])
def test_resolve_dtype(name, model, device, bf16, expected):
    assert resolve_dtype(name, model, device, bf16_supported=bf16) == expected
    assert load_config(dtype=name).resolve_dtype(model, device, bf16) == expected


@pytest.mark.parametrize("spelling,name", [
    ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"), ("torch.float16", "fp16"),
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("bfloat", "bf16"), ("torch.bfloat16", "bf16"),
    ("fp32", "fp32"), ("float32", "fp32"), ("float", "fp32"), ("torch.float32", "fp32"),
    ("int8", "int8"), ("torch.int8", "int8"), ("auto", "auto"), ("BF16", "bf16"),
])
def test_every_dtype_spelling(spelling, name):
    assert load_config(dtype=spelling).dtype == name
