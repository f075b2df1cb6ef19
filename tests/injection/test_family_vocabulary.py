"""The architecture-feature fields of the policy vocabulary: validation, value sources, and the attention
math they select (against explicit PyTorch references)."""

from __future__ import annotations

import math

import pytest
import torch

from policyinject.errors import PolicyError
from policyinject.modules.attention import alibi_bias, alibi_slopes, attention
from policyinject.policy import AttentionSpec, read_value


def test_invalid_combinations_are_refused():
    with pytest.raises(PolicyError, match="ALiBi"):
        AttentionSpec(q="q", k="k", v="v", o="o", rotary="half", alibi=True)
    with pytest.raises(PolicyError, match="qk_norm_layout"):
        AttentionSpec(q="q", k="k", v="v", o="o", qk_norm_layout="btdh")
    with pytest.raises(PolicyError, match="rotary_tables"):
        AttentionSpec(q="q", k="k", v="v", o="o", rotary_tables="cat")
    with pytest.raises(ValueError):
        AttentionSpec(q="q", k="k", v="v", o="o", qk_norm_scope="layer")


def test_value_sources():
    class Cfg:
        scale = 0.5
        attn_config = type("A", (), {"clip_qkv": 2})()

    assert read_value(Cfg(), "scale") == 0.5
    assert read_value(Cfg(), "attn_config.clip_qkv") == 2.0
    assert read_value(Cfg(), ("missing", "scale")) == 0.5
    assert read_value(Cfg(), "missing") is None
    assert read_value(None, 3) == 3.0
    assert read_value(Cfg(), lambda c: None) is None
    with pytest.raises(PolicyError):
        read_value(Cfg(), True)


@pytest.mark.parametrize("heads", [1, 4, 6, 12])
def test_alibi_slopes_are_blooms(heads):
    # BLOOM's build_alibi_tensor slopes, written out
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    want = [base ** i for i in range(1, closest + 1)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        want += [extra ** i for i in range(1, 2 * (heads - closest) + 1, 2)]
    assert torch.allclose(alibi_slopes(heads), torch.tensor(want), rtol=1e-6)


def _reference(q, k, v, scale, softcap=None, bias=None):
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("softcap, with_alibi", [(2.0, False), (None, True), (1.5, True)])
def test_softcap_and_alibi_attention_match_reference(softcap, with_alibi):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    pos = torch.arange(5)
    bias = alibi_bias(alibi_slopes(4), pos, pos, torch.float32) if with_alibi else None
    got = attention(q, k, v, None, causal=True, scale=0.3, softcap=softcap, bias=bias)
    want = _reference(q, k, v, 0.3, softcap, bias)
    err = (got - want).norm() / want.norm()
    assert err < 1e-6 and not torch.isnan(got).any()
