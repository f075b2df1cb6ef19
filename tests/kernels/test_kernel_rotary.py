"""Triton rotary kernel vs the PyTorch reference, on the CPU under TRITON_INTERPRET=1 (tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DTYPES, assert_close, poisoned_alloc, randn
from policyinject.errors import UnsupportedError
from policyinject.kernels import reference
from policyinject.kernels.rotary import RotaryConfig, launch_rotary, rotary, rotary_config


def hf_cos_sin(batch: int, tokens: int, rot: int, dtype: torch.dtype, base: float = 10000.0, offset: int = 0):
    """cos/sin like HF ``LlamaRotaryEmbedding``: ``[B, T, R]`` built as ``cat(freqs, freqs)``."""
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    pos = torch.arange(offset, offset + tokens, dtype=torch.float32)[None, :].expand(batch, tokens)
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def hf_qk(b: int, hq: int, hkv: int, t: int, d: int, dtype: torch.dtype):
    """q/k as HF makes them: ``proj(x).view(B, T, H, D).transpose(1, 2)`` (non-contiguous views)."""
    q = randn(b, t, hq * d, dtype=dtype).view(b, t, hq, d).transpose(1, 2)
    k = randn(b, t, hkv * d, dtype=dtype).view(b, t, hkv, d).transpose(1, 2)
    return q, k


# (B, Hq, Hkv, T, D, R, cos_kind)
CASES = [
    (2, 4, 2, 3, 16, 16, "BTR"),  # GQA, full rotary
    (1, 6, 2, 5, 24, 12, "TR"),  # partial rotary, non-power-of-2 half (6), 2-d cos
    (2, 3, 3, 2, 20, 8, "1TR"),  # MHA, partial, cos shared over the batch
    (1, 8, 1, 1, 32, 32, "BTR"),  # decode: one token, MQA
]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rotary_matches_reference(case: tuple, dtype: torch.dtype, layout: str) -> None:
    b, hq, hkv, t, d, rot, kind = case
    q, k = hf_qk(b, hq, hkv, t, d, dtype)
    shape = {"BTR": (b, t, rot), "TR": (t, rot), "1TR": (1, t, rot)}[kind]
    cos, sin = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)  # any values: tests the algebra
    with poisoned_alloc():
        qo, ko = rotary(q, k, cos, sin, layout, rotary_dim=rot, backend="triton")
    rq, rk = reference.rotary(q, k, cos, sin, layout, rot)
    assert_close(qo, rq, what="q")
    assert_close(ko, rk, what="k")
    # untouched inputs
    assert torch.isfinite(q).all() and torch.isfinite(k).all()


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_inplace(dtype: torch.dtype, layout: str) -> None:
    q, k = hf_qk(2, 4, 2, 3, 16, dtype)
    cos, sin = hf_cos_sin(2, 3, 8, dtype, offset=7)  # partial: 8 of 16 dims
    rq, rk = reference.rotary(q, k, cos, sin, layout)
    q_before, k_before = q.clone(), k.clone()
    qo, ko = rotary(q, k, cos, sin, layout, inplace=True, backend="triton")
    assert qo is q and ko is k
    assert_close(q, rq)
    assert_close(k, rk)
    assert torch.equal(q[..., 8:], q_before[..., 8:]) and torch.equal(k[..., 8:], k_before[..., 8:])


def test_rotary_real_tables_and_contiguous_inputs() -> None:
    q, k = randn(2, 4, 6, 32), randn(2, 2, 6, 32)
    cos, sin = hf_cos_sin(2, 6, 32, torch.float32, offset=100)
    with poisoned_alloc():
        qo, ko = rotary(q, k, cos, sin, backend="triton")
    rq, rk = reference.rotary(q, k, cos, sin)
    assert_close(qo, rq)
    assert_close(ko, rk)
    # a rotation keeps each pair's norm, so each head's norm
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # the output keeps q's layout
    assert qo.stride() == q.stride()


def test_rotary_output_keeps_transposed_layout() -> None:
    q, k = hf_qk(1, 2, 1, 3, 8, torch.float32)
    cos, sin = hf_cos_sin(1, 3, 8, torch.float32)
    qo, ko = rotary(q, k, cos, sin, backend="triton")
    assert qo.stride() == q.stride() and ko.stride() == k.stride()


@pytest.mark.parametrize("block_h", [1, 2, 4])
def test_rotary_launch_configs(block_h: int) -> None:
    """Head blocks that do not divide Hq/Hkv (5 and 3 heads): masked head rows."""
    q, k = randn(1, 5, 2, 16, dtype=torch.float16), randn(1, 3, 2, 16, dtype=torch.float16)
    cos, sin = randn(2, 12, dtype=torch.float16), randn(2, 12, dtype=torch.float16)
    with poisoned_alloc():
        qo, ko = launch_rotary(q, k, cos, sin, "half", None, False, RotaryConfig(block_h=block_h, num_warps=1))
    rq, rk = reference.rotary(q, k, cos, sin, "half")
    assert_close(qo, rq)
    assert_close(ko, rk)


def test_rotary_fp32_tables_with_bf16_qk() -> None:
    q, k = hf_qk(1, 2, 2, 4, 16, torch.bfloat16)
    cos, sin = hf_cos_sin(1, 4, 16, torch.float32)
    qo, ko = rotary(q, k, cos, sin, backend="triton")
    rq, rk = reference.rotary(q, k, cos, sin)
    assert_close(qo, rq)
    assert_close(ko, rk)


def test_rotary_auto_on_cpu_and_inplace_reference() -> None:
    q, k = randn(1, 2, 3, 8), randn(1, 1, 3, 8)
    cos, sin = hf_cos_sin(1, 3, 8, torch.float32)
    rq, rk = reference.rotary(q, k, cos, sin)
    qo, ko = rotary(q, k, cos, sin)
    assert torch.equal(qo, rq) and torch.equal(ko, rk)
    q2, k2 = q.clone(), k.clone()
    out = rotary(q2, k2, cos, sin, inplace=True, backend="torch")
    assert out[0] is q2 and torch.equal(q2, rq) and torch.equal(k2, rk)


def test_rotary_errors() -> None:
    q, k = randn(1, 2, 3, 8), randn(1, 1, 3, 8)
    cos, sin = hf_cos_sin(1, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        rotary(q, k, cos, sin, "neox", backend="triton")
    with pytest.raises(ValueError, match="rotary_dim=4"):
        rotary(q, k, cos, sin, rotary_dim=4, backend="triton")
    with pytest.raises(ValueError, match="must be even"):
        rotary(q, k, cos[..., :7], sin[..., :7], backend="torch")
    with pytest.raises(ValueError, match="tokens"):
        rotary(q, k, cos[:, :2], sin[:, :2], backend="triton")
    with pytest.raises(ValueError, match="same dtype"):
        rotary(q, k.half(), cos, sin, backend="triton")
    with pytest.raises(UnsupportedError, match="float64"):
        rotary(q.double(), k.double(), cos, sin, backend="triton")


def test_rotary_config_heuristics() -> None:
    assert rotary_config(4096, 32, 8, 128) == RotaryConfig(block_h=16)
    assert rotary_config(1, 32, 8, 128).block_h == 1
    assert rotary_config(64, 32, 8, 128).block_h in (2, 4)
    cfg = rotary_config(4096, 14, 2, 64)  # Qwen-style head counts
    padded = -(-14 // cfg.block_h) * cfg.block_h + -(-2 // cfg.block_h) * cfg.block_h
    assert padded <= 1.25 * 16


def test_rotary_default_config_is_memoised_heuristic() -> None:
    from policyinject.kernels import rotary as rotary_mod
    from policyinject.kernels._common import DEFAULT_SM_COUNT

    cpu = torch.device("cpu")
    for shape in [(4096, 32, 8, 128), (1, 32, 8, 128), (64, 32, 8, 128), (7, 14, 2, 64)]:
        assert rotary_mod._default_config(*shape, cpu) == rotary_config(*shape, DEFAULT_SM_COUNT)
    assert rotary_mod._default_config(1, 32, 8, 128, cpu) is rotary_mod._default_config(1, 32, 8, 128, cpu)
