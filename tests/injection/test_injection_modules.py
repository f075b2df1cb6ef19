"""Unit tests of the injected building blocks: fuse_linears, sdpa, HF call signatures, plugin discovery."""

from __future__ import annotations

import pytest
import torch

from policyinject.errors import PolicyError
from policyinject.modules._hf import CallSignature
from policyinject.modules.attention import sdpa
from policyinject.modules.fused_linear import as_linear, fuse_linears
from policyinject.testing.presets import TINY_ARCHS, tiny_model

from pi_testing import rel_err

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "gpt2", "gpt_neox", "opt", "falcon",
            "bert", "mixtral", "ministral", "seed_oss", "cwm", "smollm3", "granite", "gemma2", "gemma3", "olmo", "olmo2",
            "arcee", "starcoder2", "bloom", "mpt", "gpt_bigcode", "persimmon", "cohere", "stablelm", "helium",
            "ernie4_5", "glm")


def test_fuse_linears_concatenates_once_with_biases():
    a, b = torch.nn.Linear(8, 4, bias=True), torch.nn.Linear(8, 2, bias=False)
    fused = fuse_linears([a, b])
    assert type(fused) is torch.nn.Linear and fused.weight.shape == (6, 8)
    x = torch.randn(3, 8)
    assert torch.allclose(fused(x), torch.cat([a(x), b(x)], -1), atol=1e-6)


def test_conv1d_and_falcon_linear():
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(12, 8)
    torch.nn.init.normal_(c.bias)
    lin = as_linear(c)
    x = torch.randn(2, 3, 8)
    assert lin.weight.shape == (12, 8) and torch.allclose(lin(x), c(x), atol=1e-6)
    f1, f2 = FalconLinear(8, 4), FalconLinear(8, 4)
    fused = fuse_linears([f1, f2, c])
    assert type(fused) is torch.nn.Linear
    assert torch.allclose(fused(x), torch.cat([f1(x), f2(x), c(x)], -1), atol=1e-5)


def test_fuse_uses_cat_of_other_types_or_names_them():
    class Packed(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        @classmethod
        def cat(cls, modules):
            return cls(torch.cat([m.w for m in modules]))

    fused = fuse_linears([Packed(torch.ones(2, 3)), Packed(torch.zeros(1, 3))])
    assert fused.w.shape == (3, 3)

    class Opaque(torch.nn.Module):
        pass

    with pytest.raises(PolicyError, match="Opaque modules: the class has no `cat"):
        fuse_linears([Opaque(), Opaque()])
    with pytest.raises(PolicyError, match="different types"):
        fuse_linears([Opaque(), Packed(torch.ones(1, 3))])


def _reference_attention(q, k, v, mask, causal):
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    elif causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("hq, hkv, tq, tk, mask_kind", [
    (4, 4, 5, 5, None), (4, 2, 5, 5, None), (4, 1, 6, 6, "bool"), (4, 2, 1, 7, "bool"), (4, 2, 1, 7, "float"),
    (4, 1, 1, 7, "per_head"), (6, 3, 3, 8, "float"),
])
def test_sdpa_matches_repeated_kv_reference(hq, hkv, tq, tk, mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    mask = None
    if mask_kind is not None:
        keep = torch.ones(2, 1, tq, tk, dtype=torch.bool).tril(tk - tq)
        keep[1, :, :, :2] = False  # left padding in the second row
        keep[..., -1] |= ~keep.any(-1)  # no query row entirely masked (its softmax would be NaN)
        if mask_kind == "float":
            mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        elif mask_kind == "per_head":
            mask = torch.zeros(2, hq, tq, tk).normal_(generator=g).masked_fill(~keep, torch.finfo(torch.float32).min)
        else:
            mask = keep
    got = sdpa(q, k, v, mask, causal=True)
    want = _reference_attention(q, k, v, mask, causal=True)
    assert got.shape == (2, hq, tq, 8)
    assert rel_err(got, want) < 1e-5


def test_call_signatures_of_installed_transformers():
    from transformers.models.falcon.modeling_falcon import FalconDecoderLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    gpt2 = CallSignature.of(GPT2Block)
    assert gpt2.names[:3][0] == "hidden_states" and gpt2.names[1] in ("cache", "past_key_values", "layer_past")
    assert CallSignature.of(LlamaDecoderLayer).tuple_len == 0
    assert CallSignature.of(LlamaAttention).tuple_len == 2
    assert CallSignature.of(FalconDecoderLayer).tuple_len == 2  # returns (hidden, attn_weights)


def test_builtin_plugins_are_entry_points():
    from policyinject._plugin_manager import PluginManager

    pm = PluginManager.default()
    infos = {p.name: p for p in pm.plugins()}
    for family in FAMILIES:
        info = infos[family]
        assert info.builtin and info.distribution == "policyinject"
        assert info.module == f"policyinject_plugins.{family}"
        assert any(r.startswith("layer ") for r in info.registers)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_policies_name_real_classes_and_submodules(arch):
    """Class names resolve in the installed transformers; every role path exists on the tiny model."""
    from policyinject.policy.matching import match_layers
    from policyinject._plugin_manager import PluginManager

    pm = PluginManager.default()
    ps = pm.collect()
    model = tiny_model(arch)
    result = match_layers(model, user=[], plugins=list(ps.layer_policies), model_policies=list(ps.model_policies),
                          select=pm.select_policy)
    assert len(result.layers) == model.config.num_hidden_layers
    assert result.model_policy is not None
    policy = result.layers[0].policy
    assert policy.resolve_layer() is type(result.layers[0].module)
    _, unmatched, uncovered = policy.styles_for(result.layers[0].module)
    assert unmatched == [] and uncovered == []
    mp = result.model_policy
    for path in (mp.layers, mp.embed, mp.position_embed, mp.lm_head, mp.rotary_emb,
                 mp.final_norm.path if mp.final_norm else None):
        if path is not None:
            model.get_submodule(path)


def test_linear_subclasses_with_extra_state_are_not_flattened():
    """An nn.Linear subclass that stores more than weight/bias (e.g. a scale) is not treated as a plain linear."""

    class Scaled(torch.nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.register_buffer("scale", torch.ones(o))

    s = Scaled(4, 4)
    assert as_linear(s) is s
    with pytest.raises(PolicyError, match="no `cat"):
        fuse_linears([Scaled(4, 2), Scaled(4, 2)])
