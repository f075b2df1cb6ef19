"""Triton norm kernels vs the PyTorch references, on the CPU under TRITON_INTERPRET=1 (tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DTYPES, assert_close, poisoned_alloc, randn, rel_err
from policyinject.errors import UnsupportedError
from policyinject.kernels import norms, reference
from policyinject.kernels.norms import NormConfig, launch_norm, norm_config

SHAPES = [(1, 8), (3, 5, 100), (7, 4096), (2, 1, 33), (4, 1000)]


def _run(variant: str, x, r, w, b, eps, off, backend):
    if variant == "rms":
        return (norms.rms_norm(x, w, eps, off, backend=backend),)
    if variant == "add_rms":
        return norms.add_rms_norm(x, r, w, eps, off, backend=backend)
    if variant == "layer":
        return (norms.layer_norm(x, w, b, eps, backend=backend),)
    return norms.add_layer_norm(x, r, w, b, eps, backend=backend)


@pytest.mark.parametrize("variant", ["rms", "add_rms", "layer", "add_layer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_matches_reference(variant: str, dtype: torch.dtype, shape: tuple) -> None:
    n = shape[-1]
    x, r = randn(*shape, dtype=dtype, scale=2.0), randn(*shape, dtype=dtype)
    w, b = randn(n, dtype=dtype), randn(n, dtype=dtype)
    off = 1.0 if variant.endswith("rms") else 0.0
    with poisoned_alloc():
        outs = _run(variant, x, r, w, b, 1e-5, off, "triton")
    refs = _run(variant, x, r, w, b, 1e-5, off, "torch")
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert_close(o, ref, what=f"{variant} output {i}")
        assert o.is_contiguous()


@pytest.mark.parametrize("variant", ["rms", "add_rms", "layer", "add_layer"])
def test_norm_without_weight_and_bias(variant: str) -> None:
    x, r = randn(3, 40), randn(3, 40)
    with poisoned_alloc():
        outs = _run(variant, x, r, None, None, 1e-6, 0.0, "triton")
    for o, ref in zip(outs, _run(variant, x, r, None, None, 1e-6, 0.0, "torch")):
        assert_close(o, ref)


def test_norm_layer_with_weight_only() -> None:
    x, w = randn(5, 24), randn(24)
    with poisoned_alloc():
        out = norms.layer_norm(x, w, None, 1e-5, backend="triton")
    assert_close(out, reference.layer_norm(x, w, None, 1e-5))


@pytest.mark.parametrize("variant", ["rms", "add_rms", "layer", "add_layer"])
def test_norm_non_contiguous_inputs(variant: str) -> None:
    base = randn(6, 2, 64)
    x = base[:, 0, :48]  # row stride 128, 48 of 64 columns
    r = randn(48, 6).t()  # column-major: copied once
    w = randn(96)[::2]  # strided weight
    b = randn(48)
    with poisoned_alloc():
        outs = _run(variant, x, r, w, b, 1e-5, 0.0, "triton")
    for o, ref in zip(outs, _run(variant, x, r, w, b, 1e-5, 0.0, "torch")):
        assert_close(o, ref)


@pytest.mark.parametrize(
    "config",
    [NormConfig(block_m=4, num_warps=4), NormConfig(block_m=4, num_warps=2, num_programs=2), NormConfig(1, 1, 3)],
    ids=["4rows", "4rows-persistent", "1row-persistent"],
)
@pytest.mark.parametrize("is_rms", [True, False])
def test_norm_launch_configs(config: NormConfig, is_rms: bool) -> None:
    """Several rows per program, row masking (10 rows in tiles of 4), and grid-stride (persistent) programs."""
    x, r, w, b = randn(10, 72, dtype=torch.float16), randn(10, 72, dtype=torch.float16), randn(72), randn(72)
    with poisoned_alloc():
        y, s = launch_norm(x, r, w, None if is_rms else b, 1e-6, 0.5 if is_rms else 0.0, is_rms, config)
    if is_rms:
        ry, rs = reference.add_rms_norm(x, r, w, 1e-6, 0.5)
    else:
        ry, rs = reference.add_layer_norm(x, r, w, b, 1e-6)
    assert_close(y, ry)
    assert_close(s, rs)


def test_mixed_dtypes_fp32_weight_and_residual() -> None:
    """bf16 activations with an fp32 weight (keep_fp32 norms) and an fp32 residual stream."""
    x, r, w = randn(4, 96, dtype=torch.bfloat16), randn(4, 96), randn(96)
    with poisoned_alloc():
        y, s = norms.add_rms_norm(x, r, w, 1e-6, backend="triton")
    ry, rs = reference.add_rms_norm(x, r, w, 1e-6)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close(y, ry)
    assert_close(s, rs)


def test_auto_on_cpu_is_the_reference() -> None:
    x, w = randn(3, 16), randn(16)
    assert torch.equal(norms.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


def test_empty_input() -> None:
    x = torch.empty(0, 32)
    assert norms.rms_norm(x, torch.ones(32), backend="triton").shape == (0, 32)


def test_errors() -> None:
    x = randn(2, 8)
    with pytest.raises(ValueError, match="backend"):
        norms.rms_norm(x, None, backend="cuda")
    with pytest.raises(UnsupportedError, match="float64"):
        norms.rms_norm(x.double(), None, backend="triton")
    with pytest.raises(ValueError, match="weight has 7 elements"):
        norms.rms_norm(x, torch.ones(7), backend="triton")
    with pytest.raises(ValueError, match="residual shape"):
        norms.add_rms_norm(x, randn(2, 4), None, backend="triton")
    # auto falls back to the reference for dtypes the kernel does not take
    assert norms.rms_norm(x.double(), None).dtype == torch.float64


def test_norm_config_heuristics() -> None:
    assert norm_config(4096, 4096) == NormConfig(block_m=2, num_warps=8)
    assert norm_config(32, 4096).block_m == 1  # small batch: one row per program, 32 programs
    assert norm_config(1, 4096) == NormConfig(block_m=1, num_warps=8)
    cfg = norm_config(100000, 128)
    assert cfg.block_m * 128 == 8192
    assert norm_config(8, 16384).num_warps == 16


def test_poison_is_effective() -> None:
    with poisoned_alloc():
        t = torch.empty(4)
        u = torch.empty_like(t)
    assert torch.isnan(t).all() and torch.isnan(u).all()
    assert not torch.isnan(torch.zeros(1)).any()


@pytest.mark.parametrize("variant", ["layer", "add_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_single_pass_with_large_mean(variant: str, dtype: torch.dtype) -> None:
    """LayerNorm reduces (x - x[row, 0]) and its square in one pass: rows whose mean is far larger than their
    spread (and a first element far from the mean) must still match the two-pass reference."""
    if dtype == torch.bfloat16 and variant == "add_layer":
        pytest.skip("x + r near 200 in bf16: the interpreter truncates the rounded sum (1 ulp = 1.0), torch rounds")
    x = (randn(6, 200) * 0.5 + 300.0).to(dtype)
    x[:, 0] += 4.0  # the shift is not the mean
    r = (randn(6, 200) - 100.0).to(dtype)
    w, b = randn(200).to(dtype), randn(200).to(dtype)
    with poisoned_alloc():
        outs = _run(variant, x, r, w, b, 1e-5, 0.0, "triton")
    if dtype == torch.float32:
        # against float64: the float32 two-pass reference itself is off by ~3e-5 here (an ulp of 300 in float32
        # is 3e-5 of the rows' spread of 0.5); the bound stays under that input resolution
        refs = _run(variant, x.double(), r.double(), w.double(), b.double(), 1e-5, 0.0, "torch")
        for o, ref in zip(outs, refs):
            assert not torch.isnan(o).any()
            assert rel_err(o, ref.to(dtype)) < 5e-5
    else:
        for o, ref in zip(outs, _run(variant, x, r, w, b, 1e-5, 0.0, "torch")):
            assert_close(o, ref)


@pytest.mark.parametrize("variant", ["rms", "add_rms", "layer", "add_layer"])
def test_norm_streaming_config(variant: str) -> None:
    x, r, w, b = randn(5, 64), randn(5, 64), randn(64), randn(64)
    cfg = norms.NormConfig(block_m=2, num_warps=2, num_programs=2, stream=True)
    with poisoned_alloc():
        outs = norms.launch_norm(x, r if variant.startswith("add") else None, w, b if "layer" in variant else None,
                                 1e-5, 0.0, variant.endswith("rms"), cfg)
    refs = _run(variant, x, r, w, b if "layer" in variant else None, 1e-5, 0.0, "torch")
    for o, ref in zip([o for o in outs if o is not None], refs):
        assert_close(o, ref)


def test_norm_default_config_is_memoised_heuristic() -> None:
    from policyinject.kernels import norms as norms_mod
    from policyinject.kernels._common import DEFAULT_SM_COUNT

    cpu = torch.device("cpu")
    for m, n in [(4096, 4096), (32, 4096), (1, 4096), (100000, 128), (8, 16384)]:
        assert norms_mod._default_config(m, n, cpu) == norm_config(m, n, DEFAULT_SM_COUNT)
    assert norms_mod._default_config(1, 4096, cpu) is norms_mod._default_config(1, 4096, cpu)
