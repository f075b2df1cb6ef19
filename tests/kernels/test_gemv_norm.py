"""Residual add + RMSNorm + decode GEMV in one kernel (``gemv_rms_norm``) vs the float32 reference (norm,
then matmul), under TRITON_INTERPRET=1 on tiny shapes (natively on a GPU)."""

from __future__ import annotations

import os

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from kernel_checks import DTYPES, TOL, assert_close, poisoned_alloc, randn, rel_err
from policyinject.kernels.gemv import gemv_rms_norm, gemv_rms_norm_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, residual, g, eps, offset, w, bias, gated):
    """float32: s rounded to x's dtype (as the model stores it), then the norm and the matmul unrounded."""
    s = (x.float() + residual.float()).to(x.dtype) if residual is not None else x
    sf = s.float()
    n = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * (g.float() + offset)
    y = n @ w.float().T + (0 if bias is None else bias.float())
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(x.dtype), s


CASES = [  # (N or 2I, K, config, gated, with residual, with bias, weight offset)
    (24, 64, None, False, True, False, 0.0),
    (10, 200, {"BN": 4, "BK": 64}, False, True, True, 0.0),  # ragged N, masked K tail
    (40, 576, {"BN": 8, "BK": 128, "num_warps": 4}, True, True, False, 1.0),  # gated, Gemma-style offset
    (18, 96, {"BN": 2, "BK": 32}, True, False, True, 0.0),  # gated, no residual, bias
    (7, 48, None, False, False, False, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_norm_gemv_matches_norm_then_gemv(case: tuple, dtype: torch.dtype) -> None:
    n, k, config, gated, has_res, has_bias, offset = case
    x = randn(1, 1, k, dtype=dtype, device=DEVICE, scale=3.0)
    residual = randn(1, 1, k, dtype=dtype, device=DEVICE) if has_res else None
    g = randn(k, dtype=dtype, device=DEVICE, scale=0.5)
    w = randn(n, k, dtype=dtype, device=DEVICE, scale=k ** -0.5)
    bias = randn(n, dtype=dtype, device=DEVICE) if has_bias else None
    with poisoned_alloc():
        y, s = gemv_rms_norm(x, residual, g, 1e-5, w, bias, weight_offset=offset, gated=gated, backend="triton",
                             config=config)
    _, ref_s = _reference(x, residual, g, 1e-5, offset, w, bias, gated)
    ref_y, _ = _reference(s, None, g, 1e-5, offset, w, bias, gated)  # from the sum the kernel stored (below)
    assert y.shape == (1, 1, n // 2 if gated else n) and s.shape == x.shape
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter truncates fp32 -> bf16, torch rounds
        assert_close(s, ref_s, what="residual sum")
    else:
        assert torch.equal(s, ref_s), "the stored residual sum is the rounded x + residual"
    assert_close(y, ref_y, what=str(case))
    # the two-kernel path (reference backend) rounds the normalised row: same answer within the dtype's tolerance
    y_t, s_t = gemv_rms_norm(x, residual, g, 1e-5, w, bias, weight_offset=offset, gated=gated, backend="torch")
    assert torch.equal(s_t, ref_s)
    # two roundings apart (the torch path rounds the normalised row and the gate/up sums): twice the tolerance
    assert rel_err(y, y_t) <= 2 * TOL[dtype], f"{case} vs torch: {rel_err(y, y_t):.2e}"


def test_nan_in_the_row_reaches_every_output() -> None:
    """A non-finite activation must not be hidden by the post-scaling (rstd is NaN, so is every output)."""
    x = randn(1, 64, device=DEVICE)
    x[0, 5] = float("nan")
    y, _ = gemv_rms_norm(x, randn(1, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6,
                         randn(16, 64, device=DEVICE), backend="triton")
    assert torch.isnan(y).all()


def test_bad_inputs_are_named() -> None:
    x, w, g = randn(1, 64, device=DEVICE), randn(8, 64, device=DEVICE), torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="one activation row"):
        gemv_rms_norm(torch.cat([x, x]), None, g, 1e-6, w, backend="triton")
    with pytest.raises(ValueError, match="does not match weight"):
        gemv_rms_norm(x, None, g, 1e-6, w[:, :32], backend="triton")
    with pytest.raises(ValueError, match="residual"):
        gemv_rms_norm(x, x[:, :32], g, 1e-6, w, backend="triton")
    with pytest.raises(ValueError, match="norm weight"):
        gemv_rms_norm(x, None, g[:32], 1e-6, w, backend="triton")
    with pytest.raises(TypeError, match="share one dtype"):
        gemv_rms_norm(x, None, g.half(), 1e-6, w, backend="triton")
    with pytest.raises(ValueError, match="even BN"):
        gemv_rms_norm(x, None, g, 1e-6, w, gated=True, backend="triton", config={"BN": 3, "BK": 64})


def test_config_never_splits_k_and_is_even_when_gated() -> None:
    for n, k in [(3072, 2048), (16384, 2048), (6144, 4096), (28672 * 2, 4096), (96, 64), (10, 200)]:
        for gated in (False, True):
            cfg = gemv_rms_norm_config(n, k, gated)
            assert "split_k" not in cfg and cfg["BN"] >= 1 and (cfg["BN"] % 2 == 0 or not gated)


def _block(dtype: torch.dtype):
    from policyinject.modules.attention import sdpa
    from policyinject.modules.block import InjectedBlock
    from policyinject.modules.fast_linear import DecodeLinear
    from policyinject.testing.presets import tiny_model
    from policyinject_plugins.llama import LLAMA_LAYER

    torch.manual_seed(0)
    model = tiny_model("llama").to(DEVICE, dtype)
    for layer in model.model.layers:  # non-trivial norm weights, so a skipped norm shows
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = randn(*norm.weight.shape, dtype=dtype, device=DEVICE, scale=0.3) + 1
    block = InjectedBlock.build(model.model.layers[0], LLAMA_LAYER, num_heads=4, num_kv_heads=2, head_dim=16,
                                backend="triton")
    block.attn.qkv = DecodeLinear.from_linear(block.attn.qkv, backend="triton")
    block.mlp.up = DecodeLinear.from_linear(block.mlp.up, backend="triton")
    x = randn(1, 1, 64, dtype=dtype, device=DEVICE)
    pe = model.model.rotary_emb(x, torch.arange(1, device=DEVICE)[None])
    return block, x, pe, (lambda q, k, v: sdpa(q, k, v, None))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_block_folds_both_norms_into_its_decode_gemvs(dtype: torch.dtype, monkeypatch) -> None:
    """One decode row through ``run_deferred``: the qkv and gate|up GEMVs take the residual add and the norm
    (two fused calls, no norm kernel) and give the two-kernel path's result."""
    import policyinject.modules.fast_linear as fast_linear
    import policyinject.kernels.norms as norms

    block, x, pe, attend = _block(dtype)
    pending = randn(1, 1, 64, dtype=dtype, device=DEVICE)
    block.fuse_norms = False
    want_out, want_h = block.run_deferred(x, pending, *pe, attend)
    calls = {"fused": 0, "norm": 0}
    fused_fn, norm_fn = fast_linear.gemv_rms_norm, norms.add_rms_norm

    def counting_fused(*a, **k):
        calls["fused"] += 1
        return fused_fn(*a, **k)

    def counting_norm(*a, **k):
        calls["norm"] += 1
        return norm_fn(*a, **k)

    monkeypatch.setattr(fast_linear, "gemv_rms_norm", counting_fused)
    monkeypatch.setattr(norms, "add_rms_norm", counting_norm)
    block.fuse_norms = True
    got_out, got_h = block.run_deferred(x, pending, *pe, attend)
    assert calls == {"fused": 2, "norm": 0}
    assert_close(got_h, want_h, what="residual stream")  # h = x + attention output, which moved by rounding
    assert_close(got_out, want_out, what="block output")
    # more than one row (prefill): the two-kernel path
    calls.update(fused=0, norm=0)
    xs = randn(1, 3, 64, dtype=dtype, device=DEVICE)
    block.run_deferred(xs, xs, *[t.expand(1, 3, -1) for t in pe], attend)
    assert calls == {"fused": 0, "norm": 2}


@pytest.mark.gpu
def test_folded_norms_decode_graphs_give_the_eager_tokens(monkeypatch) -> None:
    """With ``fuse_norms`` on, a graphed decode gives the eager decode's tokens and the fused kernel runs
    (a Llama big enough that its qkv and gate|up become decode GEMV modules)."""
    import policyinject.modules.fast_linear as fast_linear
    from policyinject import init_inference
    from policyinject.decode.generate import Decoder
    from policyinject.modules.block import InjectedBlock
    from policyinject.testing.presets import tiny_model

    model = tiny_model("llama", dtype=torch.bfloat16, device="cuda", hidden_size=1024, intermediate_size=2816,
                       num_attention_heads=16, num_key_value_heads=4, head_dim=64)
    engine = init_inference(model, dtype="bf16", replace_with_kernel_inject=True, max_out_tokens=64)
    blocks = [m for m in engine.module.modules() if isinstance(m, InjectedBlock)]
    assert blocks
    for b in blocks:
        b.fuse_norms = True
    calls = {"n": 0}
    fused = fast_linear.gemv_rms_norm

    def counting(*a, **k):
        calls["n"] += 1
        return fused(*a, **k)

    monkeypatch.setattr(fast_linear, "gemv_rms_norm", counting)
    ids = torch.randint(3, 256, (1, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    eager = Decoder.from_engine(engine, use_graphs=False).generate(ids, max_new_tokens=12, eos_token_id=[])
    assert calls["n"] >= 2 * len(blocks) * 11  # both projections of every layer at every decode step
    graphed = Decoder.from_engine(engine, use_graphs=True)
    assert torch.equal(graphed.generate(ids, max_new_tokens=12, eos_token_id=[]), eager)
    assert graphed.stats["replays"] >= 1
