"""The PyTorch references vs the Hugging Face modules they stand for (proves the references are right)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernel_checks import assert_close, randn
from policyinject.kernels import reference as ref

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox as neox  # noqa: E402
from transformers.models.gptj import modeling_gptj as gptj  # noqa: E402
from transformers.models.llama import modeling_llama as llama  # noqa: E402


def _llama_config(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=32)
    base.update(kw)
    return transformers.LlamaConfig(**base)


# ------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_vs_llama(dtype: torch.dtype) -> None:
    hf = llama.LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(randn(96))
    hf = hf.to(dtype)
    x = randn(2, 3, 96, dtype=dtype, scale=3.0)
    with torch.no_grad():
        assert_close(ref.rms_norm(x, hf.weight, hf.variance_epsilon), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_vs_gemma(dtype: torch.dtype) -> None:
    hf = GemmaRMSNorm(40, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(randn(40, scale=0.3))
    hf = hf.to(dtype)
    x = randn(5, 40, dtype=dtype)
    with torch.no_grad():
        assert_close(ref.rms_norm(x, hf.weight, hf.eps, weight_offset=1.0), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_vs_torch(dtype: torch.dtype, affine: str) -> None:
    hf = nn.LayerNorm(72, eps=1e-5, elementwise_affine=affine != "none", bias=affine == "weight+bias")
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(randn(*p.shape))
    hf = hf.to(dtype)
    x = randn(3, 2, 72, dtype=dtype, scale=2.0) + 0.5
    with torch.no_grad():
        assert_close(ref.layer_norm(x, hf.weight, hf.bias, hf.eps), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_norms_follow_hf_residual_wiring(dtype: torch.dtype) -> None:
    """HF decoder layers: ``hidden = residual + hidden; residual = hidden; hidden = norm(hidden)``."""
    hf = llama.LlamaRMSNorm(48, eps=1e-6).to(dtype)
    x, residual = randn(4, 48, dtype=dtype), randn(4, 48, dtype=dtype)
    with torch.no_grad():
        hidden = residual + x
        normed, new_res = ref.add_rms_norm(x, residual, hf.weight, hf.variance_epsilon)
        assert torch.equal(new_res, hidden)
        assert_close(normed, hf(hidden))
        ln = nn.LayerNorm(48).to(dtype)
        normed, new_res = ref.add_layer_norm(x, residual, ln.weight, ln.bias, ln.eps)
        assert torch.equal(new_res, hidden)
        assert_close(normed, ln(hidden))


# ------------------------------------------------------------------------------------------------ rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_vs_llama(dtype: torch.dtype) -> None:
    cfg = _llama_config()
    emb = llama.LlamaRotaryEmbedding(cfg)
    b, t, d = 2, 7, 16
    x = randn(b, t, 64, dtype=dtype)
    pos = torch.arange(3, 3 + t)[None].expand(b, t)
    cos, sin = emb(x, pos)
    assert cos.shape == (b, t, d) and cos.dtype == dtype  # what the references expect
    q = randn(b, t, 4, d, dtype=dtype).transpose(1, 2)
    k = randn(b, t, 2, d, dtype=dtype).transpose(1, 2)
    hq, hk = llama.apply_rotary_pos_emb(q, k, cos, sin)
    rq, rk = ref.rotary(q, k, cos, sin, layout="half")
    assert_close(rq, hq)
    assert_close(rk, hk)


def test_rotary_vs_gpt_neox_partial() -> None:
    cfg = transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25, vocab_size=32)
    emb = neox.GPTNeoXRotaryEmbedding(cfg)
    b, t, d = 2, 5, 16
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = emb(randn(b, t, 64), pos)
    assert cos.shape == (b, t, 4)  # rotary_dim = 0.25 * head_dim
    q, k = randn(b, 4, t, d), randn(b, 4, t, d)
    hq, hk = neox.apply_rotary_pos_emb(q, k, cos, sin)
    rq, rk = ref.rotary(q, k, cos, sin, layout="half", rotary_dim=4)
    assert_close(rq, hq)
    assert_close(rk, hk)


def test_rotary_vs_gptj_interleaved() -> None:
    """GPT-J: interleaved pairs, partial rotary; its half-size sin/cos tables -> interleaved convention."""
    b, t, h, d, rot = 2, 6, 3, 16, 8
    table = gptj.create_sinusoidal_positions(32, rot)  # [pos, rot]: sin half then cos half
    pos = torch.arange(4, 4 + t)[None].expand(b, t)
    sin, cos = torch.split(table[pos], rot // 2, dim=-1)  # [B, T, rot/2] each
    q_bthd, k_bthd = randn(b, t, h, d), randn(b, t, h, d)

    def hf_apply(x):  # what GPTJAttention does with rotary_dim
        x_rot = gptj.apply_rotary_pos_emb(x[..., :rot], sin, cos)
        return torch.cat([x_rot, x[..., rot:]], dim=-1).transpose(1, 2)  # -> [B, H, T, D]

    c2, s2 = ref.interleave_cos_sin(cos, sin)
    rq, rk = ref.rotary(q_bthd.transpose(1, 2), k_bthd.transpose(1, 2), c2, s2, layout="interleaved", rotary_dim=rot)
    assert_close(rq, hf_apply(q_bthd))
    assert_close(rk, hf_apply(k_bthd))


# ------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    ("hf_act", "canonical"),
    [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu", "gelu")],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gated_act_vs_act2fn(hf_act: str, canonical: str, dtype: torch.dtype) -> None:
    gate, up = randn(3, 40, dtype=dtype, scale=3.0), randn(3, 40, dtype=dtype)
    expected = ACT2FN[hf_act](gate) * up
    assert_close(ref.gated_act(torch.cat([gate, up], -1), hf_act), expected)
    assert_close(ref.gated_act(torch.cat([gate, up], -1), canonical), expected)
    if canonical == "silu":
        assert_close(ref.swiglu(gate, up), expected)
    else:
        assert_close(ref.geglu(gate, up, "tanh" if canonical == "gelu_tanh" else "none"), expected)


def test_gated_act_vs_llama_mlp() -> None:
    """LlamaMLP = down(act(gate(x)) * up(x)); with gate/up fused as one [2I, H] linear."""
    mlp = llama.LlamaMLP(_llama_config())
    x = randn(2, 5, 64)
    fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
    with torch.no_grad():
        ours = mlp.down_proj(ref.gated_act(x @ fused.t(), "silu"))
        assert_close(ours, mlp(x))
