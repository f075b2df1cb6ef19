"""Config keys that would do nothing in the configuration given must say so (loud or right).

Found by the edge-case suite: ``quant.weight.num_bits: 4`` (or ``quant.checkpoint``, ``quant.lm_head.enabled``,
``quant.weight.method``, ``quant.calibration``) without ``quant.enabled`` quantized nothing and said nothing;
``save_mp_checkpoint_path`` without tensor parallelism or a checkpoint wrote nothing and said nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import policyinject as pi
from policyinject.config import load_config, parse_config


def _messages(**kwargs):
    return [str(w) for w in parse_config(**kwargs).warnings]


@pytest.mark.parametrize("quant", [
    {"weight": {"num_bits": 4}},
    {"weight": {"method": "gptq"}},
    {"checkpoint": "/tmp/never-read.safetensors"},
    {"lm_head": {"enabled": True}},
    {"calibration": {"num_samples": 3}},
])
def test_quant_settings_without_quant_enabled_warn_naming_the_key(quant):
    messages = _messages(quant=quant)
    assert any("quant.enabled" in m for m in messages), messages
    leaf = next(iter(quant.values()))
    name = next(iter(quant)) if not isinstance(leaf, dict) else f"{next(iter(quant))}.{next(iter(leaf))}"
    assert any(f"quant.{name}" in m for m in messages), messages


@pytest.mark.parametrize("config", [
    {},
    {"quant": {"enabled": True, "weight": {"num_bits": 4}}},
    {"dtype": "int8", "quant": {"lm_head": {"enabled": True}}},
    {"quant": {"weight": {"enabled": False}}},  # switching off what is off: nothing requested
    {"quant": {"qkv": {"enabled": False}}},
    {"quant": {"enabled": False}},
    {"quant": {"enabled": False, "weight": {"num_bits": 4}}},  # said off explicitly (DeepSpeed files do)
])
def test_no_warning_where_the_quant_settings_are_used_or_ask_for_nothing(config):
    assert [m for m in _messages(**config) if "quant.enabled" in m] == []


def test_round_trip_of_a_default_config_stays_silent():
    cfg = load_config()
    assert parse_config(cfg.to_dict()).warnings == ()


def test_the_warning_is_emitted_by_init_inference_and_the_model_runs_unquantized():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.warns(UserWarning, match=r"quant\.weight\.num_bits.*quant\.enabled"):
        engine = pi.init_inference(model, dtype="fp32", quant={"weight": {"num_bits": 4}})
    assert type(engine.module[0]) is torch.nn.Linear


def test_save_mp_checkpoint_path_without_tensor_parallel_or_checkpoint_warns(tmp_path):
    target = tmp_path / "resharded"
    messages = _messages(save_mp_checkpoint_path=str(target))
    assert any("save_mp_checkpoint_path" in m and "tp_size" in m for m in messages), messages
    with pytest.warns(UserWarning, match="save_mp_checkpoint_path"):
        pi.init_inference(torch.nn.Sequential(torch.nn.Linear(8, 8)), dtype="fp32",
                          save_mp_checkpoint_path=str(target))
    assert not target.exists()


def test_save_mp_checkpoint_path_with_tensor_parallel_or_a_checkpoint_does_not_warn():
    for extra in ({"tensor_parallel": {"tp_size": 2}}, {"checkpoint": "/ckpt/dir"}):
        messages = _messages(save_mp_checkpoint_path="/out", **extra)
        assert not any("save_mp_checkpoint_path" in m for m in messages), (extra, messages)


def test_alias_spelling_is_kept_in_the_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config({"quant": {"weight": {"num_bits": 4}}})
    assert any("quant.weight.num_bits" in str(w.message) for w in caught)
