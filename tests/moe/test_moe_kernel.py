"""The fused MoE Triton kernels against the plain-PyTorch reference (interpreter on CPU, tiny shapes).

Both launch paths are forced: the GEMV pair (decode: only the selected experts' rows are read) and the
grouped GEMM over tokens sorted by expert (prefill). Outputs are allocated NaN-poisoned, so an element a
kernel fails to write fails the test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from kernel_checks import TOL, poisoned_alloc, rel_err  # noqa: E402

from policyinject.kernels.moe import MoEConfig, align_tokens, fused_moe, moe_reference, route  # noqa: E402

pytest.importorskip("triton")

GEMV = MoEConfig(gemv=True, block_m=1, block_n=16, block_k=16)
GEMM = MoEConfig(gemv=False, block_m=16, block_n=16, block_k=16)
#: K steps of two int4 groups of 16 (per-group scales broadcast over the tile) and 16 output rows
GEMM_WIDE_K = MoEConfig(gemv=False, block_m=16, block_n=16, block_k=32)
GEMV_SPLIT_DOWN = MoEConfig(gemv=True, block_m=1, block_n=16, block_k=16, block_n_down=4)
#: K steps of 32: int4 group 16 -> two groups per step (per-group sums), group 32 -> one
GEMV_WIDE_K = MoEConfig(gemv=True, block_m=1, block_n=8, block_k=32, block_n_down=4)
#: the down projection one program per (pair, column block), partials summed afterwards
GEMV_PER_PAIR = MoEConfig(gemv=True, block_m=1, block_n=16, block_k=32, block_n_down=8, down_per_pair=True)


def _case(t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, gated: bool = True, bias: bool = False,
          seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w13 = (torch.randn(e, (2 if gated else 1) * i, h, generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, generator=g) / i ** 0.5).to(dtype)
    b13 = torch.randn(e, w13.shape[1], generator=g).to(dtype) if bias else None
    b2 = torch.randn(e, h, generator=g).to(dtype) if bias else None
    weights, ids = route(torch.randn(t, e, generator=g), k, normalize=True)
    return x, w13, w2, b13, b2, ids, weights


def _ref(x, w13, w2, b13, b2, ids, weights, act, gated):
    f = lambda v: None if v is None else v.float()  # noqa: E731
    return moe_reference(f(x), f(w13), f(w2), ids, weights, act, gated, f(b13), f(b2))


@pytest.mark.parametrize("cfg", [GEMV, GEMM, GEMV_PER_PAIR], ids=["gemv", "gemm", "gemv_pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_fused_moe_matches_reference(cfg: MoEConfig, dtype: torch.dtype) -> None:
    x, w13, w2, b13, b2, ids, w = _case(t=5, e=4, k=2, h=40, i=24, dtype=dtype)  # H, I not block multiples
    with poisoned_alloc():
        out = fused_moe(x, w13, w2, ids, w, "silu", backend="triton", config=cfg)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, _ref(x, w13, w2, b13, b2, ids, w, "silu", True)) <= TOL[dtype]


@pytest.mark.parametrize("cfg", [GEMV, GEMM], ids=["gemv", "gemm"])
@pytest.mark.parametrize("act,gated,bias", [("gelu_tanh", True, False), ("gelu", False, True), ("relu", False, False),
                                            ("swiglu_clamped", True, True)])
def test_activations_bias_and_plain_experts(cfg: MoEConfig, act: str, gated: bool, bias: bool) -> None:
    x, w13, w2, b13, b2, ids, w = _case(t=3, e=3, k=2, h=32, i=16, dtype=torch.float32, gated=gated, bias=bias,
                                        seed=3)
    with poisoned_alloc():
        out = fused_moe(x, w13, w2, ids, w, act, gated=gated, b13=b13, b2=b2, alpha=1.5, limit=0.5,
                        backend="triton", config=cfg)
    ref = moe_reference(x, w13, w2, ids, w, act, gated, b13, b2, alpha=1.5, limit=0.5)
    assert rel_err(out, ref) <= 1e-5


def test_many_experts_top8_prefill() -> None:
    """Qwen3-30B-A3B's routing shape (128 experts, top-8) in miniature: most experts get 0 or 1 pair."""
    x, w13, w2, b13, b2, ids, w = _case(t=6, e=32, k=8, h=32, i=16, dtype=torch.float32, seed=7)
    with poisoned_alloc():
        gemm = fused_moe(x, w13, w2, ids, w, backend="triton", config=GEMM)
        gemv = fused_moe(x, w13, w2, ids, w, backend="triton", config=GEMV)
    ref = moe_reference(x, w13, w2, ids, w)
    assert rel_err(gemm, ref) <= 1e-5 and rel_err(gemv, ref) <= 1e-5


def test_default_config_picks_by_token_count() -> None:
    for t in (1, 12):
        x, w13, w2, b13, b2, ids, w = _case(t=t, e=4, k=2, h=32, i=16, dtype=torch.float32, seed=t)
        out = fused_moe(x, w13, w2, ids, w, backend="triton")
        assert rel_err(out, moe_reference(x, w13, w2, ids, w)) <= 1e-5


@pytest.mark.parametrize("t,e,k,bm", [(1, 8, 2, 16), (7, 4, 2, 4), (20, 16, 4, 8), (3, 128, 8, 16)])
def test_align_tokens(t: int, e: int, k: int, bm: int) -> None:
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(r))[:k] for r in range(t)])
    a = align_tokens(ids, e, bm)
    n = t * k
    assert a.sorted_ids.numel() == a.max_blocks * bm == a.block_expert.numel() * bm
    real = a.sorted_ids[a.sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    flat = ids.reshape(-1)
    for b in range(a.max_blocks):
        rows = a.sorted_ids[b * bm:(b + 1) * bm]
        rows = rows[rows < n]
        expert = int(a.block_expert[b])
        if expert == e:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()
    used = int((a.block_expert < e).sum())
    counts = torch.bincount(flat, minlength=e)
    assert used == int(((counts + bm - 1) // bm).sum())


def test_injected_moe_on_triton_matches_hf() -> None:
    from moe_models import tiny_moe_model

    from policyinject.modules.moe import InjectedMoE

    for family in ("qwen2_moe", "gpt_oss"):
        model, spec = tiny_moe_model(family, intermediate_size=16, moe_intermediate_size=16)
        block = next(m for m in model.modules() if spec.matches(m))
        inj = InjectedMoE.build(block, spec, model.config, backend="triton")
        for tokens in (1, 12):  # GEMV and grouped GEMM
            x = torch.randn(1, tokens, 64)
            with torch.no_grad():
                out, ref = inj(x), block(x)
            out, ref = (out[0], ref[0]) if isinstance(ref, tuple) else (out, ref)
            assert rel_err(out, ref) <= 1e-5, (family, tokens)


def test_shape_errors() -> None:
    x, w13, w2, b13, b2, ids, w = _case(t=2, e=4, k=2, h=32, i=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13[:, :20], w2, ids, w, backend="triton")
    with pytest.raises(ValueError, match="unknown expert activation"):
        fused_moe(x, w13, w2, ids, w, "tanh", backend="triton")
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        fused_moe(x, w13, w2, ids[:, :1], w, backend="triton")


@pytest.mark.parametrize("cfg", [GEMV, GEMM, GEMM_WIDE_K, GEMV_SPLIT_DOWN, GEMV_WIDE_K, GEMV_PER_PAIR],
                         ids=["gemv", "gemm", "gemm_k32", "gemv_bn4", "gemv_k32", "gemv_pairs"])
@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (8, None, False), (4, 16, True), (4, 32, False)],
                         ids=["int8", "int8_asym", "int4_g16", "int4_g32_asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_quantized_experts_match_dequantized_reference(cfg: MoEConfig, bits: int, group, symmetric: bool,
                                                       dtype: torch.dtype) -> None:
    from policyinject.kernels.moe import dequantize_experts, quantize_experts

    x, w13, w2, b13, b2, ids, w = _case(t=5, e=4, k=2, h=64, i=32, dtype=torch.float32, seed=11)
    q13, q2 = (quantize_experts(v, bits, group, symmetric) for v in (w13, w2))
    x = x.to(dtype)
    with poisoned_alloc():
        out = fused_moe(x, q13, q2, ids, w, backend="triton", config=cfg)
    ref = moe_reference(x.float(), dequantize_experts(q13), dequantize_experts(q2), ids, w)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= (1e-5 if dtype == torch.float32 else 3e-2)
    # the torch path dequantizes the same bytes
    assert rel_err(fused_moe(x.float(), q13, q2, ids, w, backend="torch"), ref) <= 1e-5


@pytest.mark.parametrize("cfg", [GEMV, GEMM, GEMV_PER_PAIR], ids=["gemv", "gemm", "gemv_pairs"])
@pytest.mark.parametrize("bias", [False, True])
def test_out_of_range_ids_contribute_nothing(cfg: MoEConfig, bias: bool) -> None:
    """Expert parallelism marks the experts of other ranks with -1: the kernels skip those pairs."""
    x, w13, w2, b13, b2, ids, w = _case(t=6, e=4, k=2, h=32, i=16, dtype=torch.float32, bias=bias, seed=5)
    ids = ids.clone()
    ids[0, 0] = -1
    ids[2] = -1           # a token with no local expert at all
    ids[4, 1] = -1
    with poisoned_alloc():
        out = fused_moe(x, w13, w2, ids, w, "silu", b13=b13, b2=b2, backend="triton", config=cfg)
    ref = moe_reference(x, w13, w2, ids, w, "silu", True, b13, b2)
    assert torch.isfinite(out).all()
    assert out[2].abs().max() == 0
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("t,e,k", [(1, 128, 8), (5, 8, 2), (3, 60, 6), (4, 64, 4)])
@pytest.mark.parametrize("order,normalize", [("softmax_topk", True), ("softmax_topk", False), ("topk_softmax", False)])
@pytest.mark.parametrize("round_to", [None, torch.bfloat16])
def test_fused_routing_matches_route(t: int, e: int, k: int, order: str, normalize: bool, round_to) -> None:
    """The one-launch routing kernel picks the same experts in the same order as :func:`route` (fresh random
    logits, no ties) with the same weights, rounded through the model's dtype when asked."""
    from policyinject.kernels.moe import route_fused

    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e + k)) * 3
    weights, ids = route_fused(logits, k, order, normalize, round_to=round_to, backend="triton")
    ref_w, ref_i = route(logits, k, order, normalize)
    if round_to is not None:
        ref_w = ref_w.to(round_to).float()
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), ref_i)
    assert rel_err(weights, ref_w) <= 1e-6


@pytest.mark.parametrize("cfg", [GEMV, GEMV_WIDE_K, GEMM_WIDE_K, GEMV_PER_PAIR],
                         ids=["gemv", "gemv_k32", "gemm_k32", "gemv_pairs"])
@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)], ids=["int8", "int4_g16"])
def test_out_of_range_ids_contribute_nothing_quantized(cfg: MoEConfig, bits: int, group) -> None:
    """The quantized paths read wrapped rows without masks: a pair of another rank must still add nothing."""
    from policyinject.kernels.moe import dequantize_experts, quantize_experts

    x, w13, w2, _, _, ids, w = _case(t=6, e=4, k=2, h=64, i=32, dtype=torch.float32, seed=7)
    q13, q2 = (quantize_experts(v, bits, group, False) for v in (w13, w2))
    ids = ids.clone()
    ids[1, 0] = -1
    ids[3] = -1
    with poisoned_alloc():
        out = fused_moe(x, q13, q2, ids, w, backend="triton", config=cfg)
    ref = moe_reference(x, dequantize_experts(q13), dequantize_experts(q2), ids, w)
    assert out[3].abs().max() == 0
    assert rel_err(out, ref) <= 1e-5


def test_quantized_experts_take_the_gemv_path_while_pairs_are_sparse() -> None:
    from policyinject.kernels.moe import moe_config

    assert moe_config(16, 2048, 768, top_k=8, num_experts=128, quantized=True).gemv
    assert not moe_config(16, 2048, 768, top_k=8, num_experts=128).gemv
    assert not moe_config(16, 4096, 14336, top_k=2, num_experts=8, quantized=True).gemv  # 4 pairs per expert
