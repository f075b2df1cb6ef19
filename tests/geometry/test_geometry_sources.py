"""``layer_geometry``: each size source (literal, config names, ``config -> int``, ``(layer, config) -> int``),
the attribute and shape fallbacks, and which config a layer reads (``config_for_layer``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from policyinject.errors import PolicyError
from policyinject.policy import AttentionSpec
from policyinject.policy.geometry import HeadCounts, config_for_layer, layer_geometry
from policyinject.policy.model import read_size


def _layer(q=32, k=16, fused=None) -> nn.Module:
    layer = nn.Module()
    layer.attn = nn.Module()
    if fused:
        layer.attn.qkv = nn.Linear(32, fused)
    else:
        layer.attn.q, layer.attn.k, layer.attn.v = nn.Linear(32, q), nn.Linear(32, k), nn.Linear(32, k)
    layer.attn.o = nn.Linear(q, 32)
    return layer


SEP = AttentionSpec(module="attn", q="q", k="k", v="v", o="o")


def test_literal_needs_no_config_and_shapes_give_the_rest():
    spec = AttentionSpec(module="attn", q="q", k="k", v="v", o="o", num_heads=4)
    assert layer_geometry(_layer(), spec, None) == HeadCounts(4, 2, 8)


def test_layer_callable_gets_the_layer_and_the_config():
    seen = []

    def heads(layer, config):
        seen.append((layer, config))
        return 4

    layer = _layer()
    spec = AttentionSpec(module="attn", q="q", k="k", v="v", o="o", num_heads=heads, num_kv_heads=lambda l, c: 4)
    assert layer_geometry(layer, spec, None) == HeadCounts(4, 4, 8)
    assert seen == [(layer, None)]


def test_config_sources_win_over_attributes_and_a_config_callable_needs_a_config():
    layer = _layer()
    layer.attn.num_heads = 2  # would say head_dim 16
    cfg = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
    assert layer_geometry(layer, SEP, cfg) == HeadCounts(4, 2, 8)
    assert layer_geometry(layer, SEP, None) == HeadCounts(2, 1, 16)  # no config: the attribute, then shapes
    assert read_size(None, lambda config: 4) is None


def test_fused_qkv_blocks_layout_gives_kv_heads_from_its_rows():
    spec = AttentionSpec(module="attn", qkv="qkv", o="o", num_heads=4, head_dim=8)
    assert layer_geometry(_layer(fused=(4 + 2 * 1) * 8), spec, None) == HeadCounts(4, 1, 8)


def test_nothing_gives_heads():
    assert layer_geometry(_layer(), SEP, None) == HeadCounts(None, None, None)


@pytest.mark.parametrize("bad", [True, lambda layer, config: 2.5, lambda layer, config: "4"])
def test_bad_sources_raise_policy_errors(bad):
    with pytest.raises(PolicyError):
        read_size(None, bad, "num_heads", layer=_layer())


def test_config_for_layer_keeps_a_plain_or_user_config_and_uses_the_sub_config_of_a_wrapper():
    text, vision = SimpleNamespace(num_attention_heads=4), SimpleNamespace(num_attention_heads=2)
    wrapper = SimpleNamespace(text_config=text, vision_config=vision)
    lm_layer, vision_layer = _layer(), _layer()
    lm_layer.attn.config, vision_layer.attn.config = text, vision
    assert config_for_layer(lm_layer, SEP, wrapper) is text
    assert config_for_layer(vision_layer, SEP, wrapper) is vision
    assert config_for_layer(_layer(), SEP, wrapper) is text  # no own config: the text sub-config
    override = SimpleNamespace(num_attention_heads=8)
    assert config_for_layer(lm_layer, SEP, override) is override
    assert config_for_layer(lm_layer, SEP, None) is text
