"""Validators, their messages and paths; strict types; keys we warn about or reject."""

import warnings

import pytest
import torch

from policyinject.config.class_ref import ClassRef

from policyinject.config import (
    ConfigError,
    InferenceConfig,
    QuantizationConfig,
    TensorParallelConfig,
    WeightQuantConfig,
    load_config,
)
from policyinject.config.keys import KEYS, Status
from policyinject.policy import AttentionSpec, Policy


def problems(config=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as e:
            load_config(config, **kwargs)
    return [(p.path, p.message) for p in e.value.problems]


# -- types ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, 1.0])
def test_bools_must_be_bools(value):
    assert problems({"enable_cuda_graph": value})[0][0] == "enable_cuda_graph"
    assert "expected true or false" in problems({"enable_cuda_graph": value})[0][1]


@pytest.mark.parametrize("value,message", [
    (1.5, "expected an integer, got 1.5 (float)"),
    (True, "expected an integer, got True"),
    ("2", "expected an integer, got '2' (str)"),
    (None, "expected an integer, got None"),
    (2.0, "expected an integer, got 2.0 (float)"),
])
def test_ints_must_be_ints(value, message):
    assert problems({"tp": {"tp_size": value}}) == [("tp.tp_size", message)]


@pytest.mark.parametrize("path,value", [
    ("tensor_parallel.tp_size", 0), ("tensor_parallel.tp_grain_size", 0), ("max_out_tokens", 0),
    ("min_out_tokens", 0), ("moe.ep_size", 0), ("quant.weight.q_groups", 0), ("quant.activation.q_groups", -1),
    ("cuda_graph_cache_size", 0), ("max_batch_size", 0), ("quant.weight.group_size", 0), ("training_mp_size", 0),
])
def test_lower_bounds(path, value):
    *sections, leaf = path.split(".")
    tree = {leaf: value}
    for s in reversed(sections):
        tree = {s: tree}
    assert problems(tree) == [(path, f"must be >= 1, got {value}")]


def test_all_problems_reported_together():
    found = problems({
        "tp": {"tp_size": 0, "tp_grain_size": "x"}, "dtype": "fp8", "tensor_paralel": 1,
        "quant": {"weight": {"num_bits": 3}}, "kernel_inject": "yes", "min_tokens": 0,
    })
    assert sorted(p for p, _ in found) == sorted([
        "tp.tp_size", "tp.tp_grain_size", "dtype", "tensor_paralel", "quant.weight.num_bits", "kernel_inject",
        "min_tokens",
    ])


def test_error_str_lists_one_problem_per_line():
    with pytest.raises(ConfigError) as e:
        load_config({"tp": {"tp_size": 0}, "max_tokens": 0})
    assert str(e.value).splitlines() == ["tp.tp_size: must be >= 1, got 0", "max_tokens: must be >= 1, got 0"]
    assert isinstance(e.value, ValueError)


# -- unknown keys -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,path,message", [
    ({"tensor_paralel": {}}, "tensor_paralel", "unknown key `tensor_paralel`; did you mean `tensor_parallel`?"),
    ({"tp": {"tp_szie": 2}}, "tp.tp_szie", "unknown key `tp_szie`; did you mean `tp_size`?"),
    ({"quant": {"weight": {"numbits": 4}}}, "quant.weight.numbits", "unknown key `numbits`; did you mean `num_bits`?"),
    ({"tp_size": 2}, "tp_size", "unknown key `tp_size`; did you mean `tensor_parallel.tp_size`?"),
    ({"zzz": 1}, "zzz", "unknown key `zzz`"),
    ({"enable_cuda_grph": True}, "enable_cuda_grph", "unknown key `enable_cuda_grph`; did you mean `enable_cuda_graph`?"),
])
def test_unknown_keys_suggest(config, path, message):
    assert problems(config) == [(path, message)]


def test_unknown_keyword_argument():
    assert problems(tensor_paralel={"tp_size": 2})[0][1].endswith("did you mean `tensor_parallel`?")


def test_non_string_key():
    assert problems({1: 2})[0][0] == "1"


@pytest.mark.parametrize("section", ["tp", "quant", "ckpt_config", "moe"])
def test_section_must_be_a_mapping(section):
    ((path, message),) = problems({section: [1]})
    assert path == section and message.startswith("expected")


# -- cross-field rules ----------------------------------------------------------------------------------

def test_cuda_graph_with_tensor_parallel_is_accepted_by_validation():
    # whether the all-reduces can be captured depends on the process group's backend, known only at init:
    # the refusal (gloo / CPU) happens at plan time (tests/tp/test_rank_agreement.py, tests/decode)
    cfg = load_config({"enable_cuda_graph": True, "tensor_parallel": {"tp_size": 2}})
    assert cfg.enable_cuda_graph and cfg.tensor_parallel.tp_size == 2


def test_cuda_graph_with_tp_size_one_is_fine():
    assert load_config(enable_cuda_graph=True, tp={"tp_size": 1}).enable_cuda_graph


def test_min_out_tokens_at_most_max():
    assert problems(max_out_tokens=8, min_out_tokens=9) == [
        ("min_out_tokens", "must be <= `max_out_tokens` (8), got 9")]
    assert problems(max_tokens=8, min_tokens=9) == [("min_tokens", "must be <= `max_tokens` (8), got 9")]
    assert load_config(max_out_tokens=8, min_out_tokens=8).min_out_tokens == 8


def test_tp_disabled_with_tp_size():
    assert problems(tp={"enabled": False, "tp_size": 2}) == [
        ("tp.enabled", "is false but `tp.tp_size` is 2; give one of them")]
    assert load_config(tp={"enabled": False}).tensor_parallel.enabled is False


def test_cross_section_rules_still_run_when_a_section_has_errors():
    found = problems({"tp": {"tp_size": 2, "tp_grain_size": 0}, "min_out_tokens": 9, "max_out_tokens": 8})
    assert [p for p, _ in found] == ["tp.tp_grain_size", "min_out_tokens"]


@pytest.mark.parametrize("value, message", [
    (0, "must be > 0 seconds, got 0"), (-1.5, "must be > 0 seconds, got -1.5"),
    (float("nan"), "must be > 0 seconds, got nan"), (float("inf"), "must be > 0 seconds, got inf"),
    (True, "expected a number of seconds, got True"), ("30", "expected a number of seconds, got '30' (str)"),
])
def test_setup_timeout_must_be_positive_seconds(value, message):
    assert problems({"tp": {"setup_timeout_s": value}}) == [("tp.setup_timeout_s", message)]


def test_setup_timeout_default_and_values():
    assert load_config().tensor_parallel.setup_timeout_s == 300.0
    assert load_config(tp={"setup_timeout_s": 5}).tensor_parallel.setup_timeout_s == 5.0
    assert load_config(tensor_parallel={"setup_timeout_s": 0.5}).tensor_parallel.setup_timeout_s == 0.5


# -- dtype ------------------------------------------------------------------------------------------

def test_dtype_int8_turns_weight_quantization_on():
    cfg = load_config(dtype="int8")
    assert cfg.quant.enabled and cfg.quant.weight.enabled and cfg.quant.weight.num_bits == 8
    assert load_config(dtype=torch.int8) == cfg == load_config(cfg.to_dict())


def test_dtype_int8_conflicts():
    assert problems(dtype="int8", quant={"weight": {"num_bits": 4}}) == [
        ("dtype", "int8 means 8-bit weight quantization, but `quant.weight.num_bits` is 4")]
    assert problems(dtype="int8", quant={"weight": {"enabled": False}}) == [
        ("dtype", "int8 means weight quantization, but `quant.weight.enabled` is false")]
    assert problems(dtype="torch.int8", quant={"enabled": False}) == [
        ("quant.enabled", "is false, but `dtype` int8 turns weight quantization on")]


@pytest.mark.parametrize("value", ["fp8", "int4", "float64", 16, None, torch.float64])
def test_bad_dtype(value):
    ((path, message),) = problems(dtype=value)
    assert path == "dtype"


# -- quantization -----------------------------------------------------------------------------------

def test_quant_bits_and_types():
    assert problems(quant={"weight": {"num_bits": 2}}) == [("quant.weight.num_bits", "must be 4 or 8, got 2")]
    ((path, message),) = problems(quant={"weight": {"q_type": "sym"}})
    assert path == "quant.weight.q_type" and '"symmetric", "asymmetric"' in message
    cfg = load_config(quant={"enabled": True, "weight": {"num_bits": 4, "q_type": "asymmetric", "q_groups": 8}})
    assert (cfg.quant.weight.num_bits, cfg.quant.weight.q_type, cfg.quant.weight.q_groups) == (4, "asymmetric", 8)


def test_group_size_and_q_groups():
    assert load_config(quant={"weight": {"group_size": 128}}).quant.weight.group_size == 128
    # q_groups 1 (the default, "one group per row") does not conflict: to_dict writes both keys.
    assert load_config(quant={"weight": {"group_size": 128, "q_groups": 1}}).quant.weight.group_size == 128
    assert problems(quant={"weight": {"group_size": 128, "q_groups": 4}}) == [
        ("quant.weight.group_size", "cannot be combined with `quant.weight.q_groups` (4); give one")]
    assert WeightQuantConfig(q_groups=4).group_size_for(4096) == 1024
    assert WeightQuantConfig(group_size=64).group_size_for(4096) == 64


# -- tp_plan --------------------------------------------------------------------------------------------

def test_tp_plan_forms():
    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
    assert load_config(tp={"tp_plan": plan}).tensor_parallel.tp_plan == plan
    assert load_config(tp={"tp_plan": "auto"}).tensor_parallel.tp_plan == "auto"
    assert load_config(tp={"tp_plan": None}).tensor_parallel.tp_plan is None


def test_tp_plan_bad_styles_name_the_entry():
    assert problems(tp={"tp_plan": {"a.*.q": "colwize", "b": "nonsense_style_xyz"}}) == [
        ("tp.tp_plan['a.*.q']", "unknown tensor-parallel style `colwize`; did you mean `colwise`?"),
        ("tp.tp_plan['b']", problems(tp={"tp_plan": {"b": "nonsense_style_xyz"}})[0][1]),
    ]
    assert problems(tp={"tp_plan": "colwise"})[0][0] == "tp.tp_plan"
    assert problems(tp={"tp_plan": {"": "colwise"}})[0][0] == "tp.tp_plan['']"


# -- injection_policy ---------------------------------------------------------------------------------

class Block(torch.nn.Module):
    pass


def test_injection_policy_forms():
    cfg = load_config(injection_policy={Block: "fc2", "torch.nn.TransformerEncoderLayer": ("linear2", "x.y")})
    # a name is kept as written (never imported); it is matched against the model's classes at plan time
    assert cfg.injection_policy == {Block: ("fc2",), ClassRef("torch.nn.TransformerEncoderLayer"): ("linear2", "x.y")}
    policy = Policy(layer=Block, attention=AttentionSpec(q="q", k="k", v="v", o="o"))
    assert load_config(injection_dict={Block: policy}).injection_policy == {Block: policy}
    assert load_config(injection_policy={}).injection_policy is None


def test_injection_policy_allowed_with_kernel_inject():
    cfg = load_config(injection_policy={Block: "fc2"}, replace_with_kernel_inject=True)
    assert cfg.replace_with_kernel_inject and cfg.injection_policy


def test_injection_policy_errors_name_the_key_as_written():
    # Names are not imported at validation: "no.such.Module" and "collections.OrderedDict" are only checked
    # at plan time, against the model's classes (tests/config/test_config_no_code_execution.py).
    found = problems(injection_dict={
        "no.such.Module": "x", "collections.OrderedDict": "x", Block: [], "torch.nn.Linear": [""], int: "x",
        "Linear": "x", "torch.nn.TransformerEncoderLayer": 3, "a..b": "x",
    })
    assert [p for p, _ in found] == [
        "injection_dict[Block]", "injection_dict['torch.nn.Linear']", "injection_dict[int]",
        "injection_dict['Linear']", "injection_dict['torch.nn.TransformerEncoderLayer']", "injection_dict['a..b']",
    ]
    messages = dict(found)
    assert "not a torch.nn.Module subclass" in messages["injection_dict[int]"]
    assert "not a qualified class name" in messages["injection_dict['Linear']"]


def test_injection_policy_policy_for_another_class():
    policy = Policy(layer="some.Other", attention=AttentionSpec(q="q", k="k", v="v"))
    ((path, message),) = problems(injection_policy={Block: policy})
    assert path == "injection_policy[Block]" and "some.Other" in message


def test_injection_policy_duplicate_class():
    ((path, message),) = problems(injection_policy={
        torch.nn.TransformerEncoderLayer: "linear2", "torch.nn.TransformerEncoderLayer": "linear2"})
    assert "more than once" in message


def test_injection_policy_not_a_mapping():
    assert problems(injection_policy=["a"])[0][0] == "injection_policy"


# -- live objects -------------------------------------------------------------------------------------

def test_mpu_and_groups():
    class Mpu:
        def get_tensor_model_parallel_group(self):
            return None

    group = object()
    cfg = load_config(tp={"mpu": Mpu(), "tp_group": group})
    assert cfg.tensor_parallel.tp_group is group
    assert problems(tp={"mpu": object()})[0][0] == "tp.mpu"
    assert problems(tp={"tp_group": "world"})[0][0] == "tp.tp_group"
    assert problems(tp={"tp_group": {}})[0][0] == "tp.tp_group"
    assert problems(tp={"tp_group": torch.ones(2)})[0][0] == "tp.tp_group"


def test_checkpoint_and_model_config():
    assert load_config(checkpoint="c.json").checkpoint == "c.json"
    assert load_config(checkpoint={"type": "ds_model", "checkpoints": []}).checkpoint["type"] == "ds_model"
    assert problems(checkpoint=5)[0][0] == "checkpoint"
    assert problems(checkpoint="")[0][0] == "checkpoint"
    assert problems(args="gpt2")[0][0] == "args"

    class HFConfig:
        def to_dict(self):
            return {"n_head": 2}

    hf = HFConfig()
    assert load_config(args=hf).config is hf


def test_choices():
    assert load_config(kernel_backend="triton").kernel_backend == "triton"
    ((path, message),) = problems(kernel_backend="cuda")
    assert path == "kernel_backend" and '"auto", "triton", "torch"' in message


# -- keys we cannot honour ---------------------------------------------------------------------------

NON_DEFAULT = {
    "use_triton": True, "triton_autotune": True, "zero": {"stage": 3}, "triangular_masking": False,
    "set_empty_params": True, "training_mp_size": 2, "transposed_mode": True,
    "quant.activation.enabled": True, "quant.activation.num_bits": 4, "quant.activation.q_type": "asymmetric",
    "quant.activation.q_groups": 2, "quant.weight.quantized_initialization": {"a": 1},
    "quant.weight.post_init_quant": {"a": 1}, "checkpoint_config.checkpoint_dir": "/c",
    "checkpoint_config.save_mp_checkpoint_path": "/c", "checkpoint_config.base_dir": "/c",
    "return_tuple": False, "moe.type": "residual",
}


def _nested(path, value):
    *sections, leaf = path.split(".")
    tree = {leaf: value}
    for s in reversed(sections):
        tree = {s: tree}
    return tree


def test_every_warns_or_error_key_has_a_case():
    statuses = {s.path for s in KEYS if s.field and s.status in (Status.WARNS, Status.ERROR)}
    assert statuses == set(NON_DEFAULT)


@pytest.mark.parametrize("path", sorted(s.path for s in KEYS if s.field and s.status is Status.WARNS))
def test_warns_keys_warn_with_their_name(path):
    with pytest.warns(UserWarning, match=f"`{path}` = .* is ignored here"):
        load_config(_nested(path, NON_DEFAULT[path]))


def test_warning_uses_the_users_spelling():
    with pytest.warns(UserWarning, match="`tm` = False"):
        load_config(tm=False)
    # a problem under an alias is reported with the alias (moe.num_experts is moe.moe_experts)
    with pytest.raises(ConfigError, match="moe.num_experts"):
        load_config(replace_with_kernel_inject=True, moe={"num_experts": 6, "ep_size": 4})


@pytest.mark.parametrize("path", sorted(s.path for s in KEYS if s.field and s.status is Status.ERROR))
def test_error_keys_are_rejected_with_their_name(path):
    ((p, message),) = problems(_nested(path, NON_DEFAULT[path]))
    assert p == path and "is not supported" in message


def test_defaults_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(load_config().to_dict())
    assert cfg == InferenceConfig()


# -- direct construction ------------------------------------------------------------------------------

def test_direct_construction_normalizes_and_validates():
    assert InferenceConfig(dtype=torch.float16).dtype == "fp16"
    assert TensorParallelConfig(tp_size=2).tp_size == 2
    with pytest.raises(ConfigError) as e:
        TensorParallelConfig(tp_size=0, tp_grain_size=True)
    assert [p.path for p in e.value.problems] == ["tp_size", "tp_grain_size"]
    with pytest.raises(ConfigError, match="expected a TensorParallelConfig"):
        InferenceConfig(tensor_parallel={"tp_size": 2})
    with pytest.raises(ConfigError, match="group_size"):
        WeightQuantConfig(group_size=32, q_groups=2)
    assert InferenceConfig(dtype="int8", quant=QuantizationConfig()).quant.enabled
