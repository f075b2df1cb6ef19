"""The key registry agrees with the attrs classes, covers DeepSpeed's vocabulary, and drives the docs."""

from pathlib import Path

import attrs
import pytest

from policyinject.config import keys
from policyinject.config.doc_table import BEGIN, END, render_block
from policyinject.config.keys import KEYS, SPECS, Status
from policyinject.config.model import SECTION_CLASSES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"

#: Reference section 1.1: every DeepSpeedInferenceConfig field.
DS_TOP = [
    "replace_with_kernel_inject", "dtype", "tensor_parallel", "enable_cuda_graph", "use_triton", "triton_autotune",
    "zero", "triangular_masking", "moe", "keep_module_on_host", "quant", "checkpoint", "base_dir",
    "set_empty_params", "save_mp_checkpoint_path", "checkpoint_config", "return_tuple", "training_mp_size",
    "replace_method", "injection_policy", "injection_policy_tuple", "config", "max_out_tokens", "min_out_tokens",
    "transposed_mode", "mp_size", "mpu", "ep_size", "ep_group", "ep_mp_group", "moe_experts", "moe_type",
]
#: Reference section 1.2: the nested configs.
DS_NESTED = [
    "tensor_parallel.enabled", "tensor_parallel.tp_size", "tensor_parallel.tp_grain_size", "tensor_parallel.mpu",
    "tensor_parallel.tp_group", "moe.enabled", "moe.ep_size", "moe.moe_experts", "moe.type", "moe.ep_mp_group",
    "moe.ep_group", "quant.enabled", "quant.activation", "quant.weight", "quant.qkv",
    "quant.activation.enabled", "quant.activation.num_bits", "quant.activation.q_type", "quant.activation.q_groups",
    "quant.weight.enabled", "quant.weight.num_bits", "quant.weight.q_type", "quant.weight.q_groups",
    "quant.weight.quantized_initialization", "quant.weight.post_init_quant", "quant.qkv.enabled",
    "checkpoint_config.checkpoint_dir", "checkpoint_config.save_mp_checkpoint_path", "checkpoint_config.base_dir",
]
OURS = ["kernel_backend", "max_batch_size", "cuda_graph_cache_size", "tensor_parallel.tp_plan",
        "tensor_parallel.setup_timeout_s", "quant.weight.group_size",
        "quant.lm_head", "quant.lm_head.enabled", "quant.weight.method", "quant.checkpoint", "quant.calibration",
        "quant.calibration.data", "quant.calibration.num_samples", "quant.calibration.seq_len",
        "quant.calibration.seed", "quant.calibration.tokenizer", "quant.calibration.act_order",
        "quant.calibration.gptq_grid", "quant.calibration.damp",
        "quant.weight.include", "quant.weight.exclude"]
ALIASES = {
    "kernel_inject": "replace_with_kernel_inject", "tp": "tensor_parallel", "injection_dict": "injection_policy",
    "args": "config", "max_tokens": "max_out_tokens", "min_tokens": "min_out_tokens",
    "ckpt_config": "checkpoint_config", "tm": "triangular_masking", "moe.num_experts": "moe.moe_experts",
    "moe.expert_group": "moe.ep_group", "moe.expert_mp_group": "moe.ep_mp_group",
    "expert_group": "ep_group", "expert_mp_group": "ep_mp_group",
}
DEPRECATED = {
    "mp_size": "tensor_parallel.tp_size", "mpu": "tensor_parallel.mpu", "ep_size": "moe.ep_size",
    "ep_group": "moe.ep_group", "ep_mp_group": "moe.ep_mp_group", "moe_experts": "moe.moe_experts",
    "moe_type": "moe.type", "replace_method": None,
}


@pytest.mark.parametrize("path", DS_TOP + DS_NESTED + OURS)
def test_every_reference_key_is_registered(path):
    assert path in SPECS


def test_no_unexpected_keys():
    assert set(SPECS) == set(DS_TOP + DS_NESTED + OURS)


def test_origins():
    assert {s.path for s in KEYS if s.origin == "policyinject"} == set(OURS)


@pytest.mark.parametrize("alias,canonical", sorted(ALIASES.items()))
def test_alias_registered(alias, canonical):
    section, _, name = alias.rpartition(".")
    assert keys.lookup(section, name) is SPECS[canonical]


def test_alias_set_is_complete():
    registered = {f"{s.parent}.{a}" if s.parent else a: s.path for s in KEYS for a in s.aliases}
    assert registered == ALIASES


@pytest.mark.parametrize("old,new", sorted(DEPRECATED.items()))
def test_deprecated_registered(old, new):
    spec = SPECS[old]
    assert spec.status is Status.DEPRECATED and spec.new == new and not spec.field


@pytest.mark.parametrize("section,cls", sorted(SECTION_CLASSES.items()))
def test_attrs_fields_match_registry(section, cls):
    fields = [f.name for f in attrs.fields(cls)]
    specs = [s.name for s in keys.section_specs(section) if s.field]
    assert fields == specs


@pytest.mark.parametrize("section,cls", sorted(SECTION_CLASSES.items()))
def test_attrs_defaults_come_from_registry(section, cls):
    obj = cls()
    for spec in keys.section_specs(section):
        if spec.field and not spec.section:
            assert getattr(obj, spec.name) == spec.default, spec.path


def test_every_spec_has_a_converter_or_is_special():
    for spec in KEYS:
        if spec.field and not spec.section:
            assert spec.convert is not None, spec.path
        if spec.status in (Status.WARNS, Status.ERROR):
            assert spec.note, spec.path


def test_docs_table_is_current():
    text = DOCS.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render_block(), "regenerate with `policyinject config table`"


@pytest.mark.parametrize("spec", KEYS, ids=lambda s: s.path)
def test_docs_mention_every_key(spec):
    assert f"`{spec.path}`" in DOCS.read_text()
