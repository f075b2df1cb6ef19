"""Every alias means its canonical key; every deprecated key moves to its new home with a warning."""

import warnings

import pytest
import torch

from policyinject.config import ConfigError, InferenceConfig, load_config

# The moe group / expert-count keys are "warns" keys; their UserWarning is tested in test_validation.py.
pytestmark = pytest.mark.filterwarnings("ignore:.*is ignored here:UserWarning")


class Group:
    """Stands in for a torch.distributed process group."""


class Mpu:
    def get_model_parallel_group(self):
        return None


GROUP = Group()
MPU = Mpu()


def quiet(*args, **kwargs) -> InferenceConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(*args, **kwargs)


ALIAS_CASES = [
    ({"kernel_inject": True}, {"replace_with_kernel_inject": True}),
    ({"tp": {"tp_size": 2, "tp_grain_size": 8}}, {"tensor_parallel": {"tp_size": 2, "tp_grain_size": 8}}),
    ({"injection_dict": {"torch.nn.TransformerEncoderLayer": "linear2"}},
     {"injection_policy": {"torch.nn.TransformerEncoderLayer": ("linear2",)}}),
    ({"args": {"num_attention_heads": 4}}, {"config": {"num_attention_heads": 4}}),
    ({"max_tokens": 77}, {"max_out_tokens": 77}),
    ({"min_tokens": 3}, {"min_out_tokens": 3}),
    ({"ckpt_config": {"checkpoint_dir": "/ckpt"}}, {"checkpoint_config": {"checkpoint_dir": "/ckpt"}}),
    ({"tm": False}, {"triangular_masking": False}),
    ({"moe": {"num_experts": [8]}}, {"moe": {"moe_experts": [8]}}),
    ({"moe": {"expert_group": GROUP}}, {"moe": {"ep_group": GROUP}}),
    ({"moe": {"expert_mp_group": GROUP}}, {"moe": {"ep_mp_group": GROUP}}),
]


@pytest.mark.parametrize("aliased,canonical", ALIAS_CASES, ids=lambda c: next(iter(c)) if isinstance(c, dict) else "")
def test_alias_in_mapping_equals_canonical(aliased, canonical):
    assert quiet(aliased) == quiet(canonical)
    assert quiet(aliased) != InferenceConfig()


@pytest.mark.parametrize("aliased,canonical", ALIAS_CASES, ids=lambda c: next(iter(c)) if isinstance(c, dict) else "")
def test_alias_as_keyword_equals_canonical(aliased, canonical):
    assert quiet(**aliased) == quiet(canonical)


def test_moe_bool_means_enabled():
    assert quiet(moe=False).moe.enabled is False
    assert load_config({"moe": True}).moe.enabled is True
    assert quiet(moe=False) == quiet(moe={"enabled": False})


@pytest.mark.parametrize("alias,canonical,value", [
    ("kernel_inject", "replace_with_kernel_inject", True),
    ("max_tokens", "max_out_tokens", 10),
    ("tp", "tensor_parallel", {"tp_size": 2}),
])
def test_alias_and_canonical_together_is_an_error(alias, canonical, value):
    with pytest.raises(ConfigError) as e:
        load_config({alias: value, canonical: value})
    assert "same key" in str(e.value)
    assert {p.path for p in e.value.problems} <= {alias, canonical, f"{canonical}.tp_size"}


def test_alias_stays_in_error_paths():
    with pytest.raises(ConfigError) as e:
        load_config({"tp": {"tp_size": 0}, "max_tokens": 1.5, "ckpt_config": {"base_dir": 3}})
    assert sorted(p.path for p in e.value.problems) == ["ckpt_config.base_dir", "max_tokens", "tp.tp_size"]


def test_alias_respelled_inside_messages():
    with pytest.raises(ConfigError) as e:
        load_config({"tp": {"tp_size": 2, "enabled": False}})
    assert "`tp.tp_size`" in str(e.value)


# -- deprecations ------------------------------------------------------------------------------------

DEPRECATIONS = [
    ("mp_size", 2, lambda c: c.tensor_parallel.tp_size, 2),
    ("mpu", MPU, lambda c: c.tensor_parallel.mpu, MPU),
    ("ep_size", 1, lambda c: c.moe.ep_size, 1),
    ("ep_group", GROUP, lambda c: c.moe.ep_group, GROUP),
    ("expert_group", GROUP, lambda c: c.moe.ep_group, GROUP),
    ("ep_mp_group", GROUP, lambda c: c.moe.ep_mp_group, GROUP),
    ("expert_mp_group", GROUP, lambda c: c.moe.ep_mp_group, GROUP),
    ("moe_experts", [4, 4], lambda c: c.moe.moe_experts, (4, 4)),
    ("moe_type", "standard", lambda c: c.moe.type, "standard"),
]


@pytest.mark.parametrize("key,value,read,expected", DEPRECATIONS, ids=[d[0] for d in DEPRECATIONS])
def test_deprecated_key_migrates_with_warning(key, value, read, expected):
    with pytest.warns(DeprecationWarning, match=f"`{key}` is deprecated"):
        cfg = load_config({key: value})
    assert read(cfg) == expected


@pytest.mark.parametrize("key,value,read,expected", DEPRECATIONS, ids=[d[0] for d in DEPRECATIONS])
def test_deprecated_key_as_keyword(key, value, read, expected):
    with pytest.warns(DeprecationWarning, match=key):
        assert read(load_config(**{key: value})) == expected


@pytest.mark.parametrize("old,new", [
    ({"mp_size": 2}, {"tensor_parallel": {"tp_size": 2}}),
    ({"mp_size": 2}, {"tp": {"tp_size": 2}}),
    ({"mpu": MPU}, {"tensor_parallel": {"mpu": MPU}}),
    ({"ep_size": 1}, {"moe": {"ep_size": 1}}),
    ({"ep_group": GROUP}, {"moe": {"ep_group": GROUP}}),
    ({"expert_group": GROUP}, {"moe": {"expert_group": GROUP}}),
    ({"ep_mp_group": GROUP}, {"moe": {"ep_mp_group": GROUP}}),
    ({"moe_experts": [2]}, {"moe": {"moe_experts": [2]}}),
    ({"moe_experts": [2]}, {"moe": {"num_experts": [2]}}),
    ({"moe_type": "standard"}, {"moe": {"type": "standard"}}),
])
def test_deprecated_with_replacement_is_an_error(old, new):
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as e:
        load_config({**old, **new})
    (old_key,) = old
    assert [p.path for p in e.value.problems] == [old_key]
    assert "together with its replacement" in e.value.problems[0].message


def test_deprecated_and_replacement_in_different_sources_follow_the_merge_rule():
    with pytest.warns(DeprecationWarning):
        assert load_config({"mp_size": 2}, tensor_parallel={"tp_size": 2}).tensor_parallel.tp_size == 2
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="tensor_parallel.tp_size"):
        load_config({"mp_size": 2}, tensor_parallel={"tp_size": 4})


def test_deprecated_value_is_validated_under_its_old_name():
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError) as e:
        load_config({"mp_size": 0})
    assert str(e.value) == "mp_size: must be >= 1, got 0"


def test_replace_method_only_warns():
    with pytest.warns(DeprecationWarning, match="replace_method"):
        cfg = load_config({"replace_method": "auto"})
    assert cfg == InferenceConfig()
    with pytest.warns(DeprecationWarning, match="replace_method"):
        assert load_config(replace_method="dict") == InferenceConfig()


def test_injection_policy_tuple_warns_and_is_dropped():
    with pytest.warns(UserWarning, match="injection_policy_tuple"):
        assert load_config({"injection_policy_tuple": [["x"]]}) == InferenceConfig()


def test_deprecated_auto_means_default_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config({"mp_size": "auto", "max_tokens": "auto", "tp": "auto"}) == InferenceConfig()


@pytest.mark.parametrize("key", ["max_out_tokens", "min_out_tokens", "zero", "quant", "moe", "enable_cuda_graph",
                                 "tensor_parallel", "training_mp_size"])
def test_auto_means_default(key):
    assert load_config({key: "auto"}) == InferenceConfig()


def test_auto_stripping_inside_sections():
    assert load_config({"tp": {"tp_size": "auto", "tp_grain_size": 8}}).tensor_parallel.tp_grain_size == 8


def test_auto_is_a_value_where_it_means_something():
    cfg = load_config({"dtype": "auto", "kernel_backend": "auto", "tensor_parallel": {"tp_plan": "auto"}})
    assert cfg.tensor_parallel.tp_plan == "auto" and cfg.dtype == "auto" and cfg.kernel_backend == "auto"
