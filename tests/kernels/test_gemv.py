"""Decode GEMV kernel vs the float32 reference, under TRITON_INTERPRET=1 on tiny shapes (natively on a GPU)."""

from __future__ import annotations

import os

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from kernel_checks import DTYPES, assert_close, poisoned_alloc, randn, rel_err
from policyinject.kernels.gemv import GEMV_MAX_M, gemv, gemv_config, gemv_gated, pick_block_k, pick_split_k
from policyinject.kernels.quant_reference import gemv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [(1, 24, 64), (1, 8, 576), (2, 16, 896), (3, 8, 1536), (4, 40, 200), (8, 8, 192), (16, 4, 64), (5, 9, 100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gemv_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    m, n, k = case
    x, w = randn(m, k, dtype=dtype, device=DEVICE), randn(n, k, dtype=dtype, device=DEVICE)
    bias = randn(n, dtype=dtype, device=DEVICE) if (m + n) % 2 else None
    with poisoned_alloc():
        out = gemv(x, w, bias, backend="triton")
    assert_close(out, gemv_reference(x, w, bias), what=str(case))


@pytest.mark.parametrize(
    "config",
    [{"BN": 4, "BK": 64, "split_k": 3}, {"BN": 2, "BK": 128, "split_k": 2}, {"BN": 8, "BK": 32, "split_k": 1},
     {"BM": 4, "BN": 4, "BK": 64, "split_k": 4}],
    ids=str,
)
def test_gemv_split_k_configs(config: dict) -> None:
    m = 3 if config.get("BM") == 4 else 1
    x, w, b = randn(m, 320, device=DEVICE), randn(12, 320, device=DEVICE), randn(12, device=DEVICE)
    with poisoned_alloc():
        out = gemv(x, w, b, backend="triton", config=config)
    assert_close(out, gemv_reference(x, w, b))


def _swiglu_reference(x, w, bias=None):
    gate, up = gemv_reference(x.float(), w.float(), None if bias is None else bias.float()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n2, k, config", [(24, 64, None), (10, 200, {"BN": 2, "BK": 64}),
                                           (40, 576, {"BN": 8, "BK": 128, "num_warps": 4})], ids=str)
def test_gated_gemv_matches_gemv_then_swiglu(n2: int, k: int, config, dtype: torch.dtype) -> None:
    """SwiGLU in the GEMV epilogue (gate row j and up row I + j in one program) vs the float32 reference:
    ragged I, a masked K tail, bias, outputs poisoned with NaN first."""
    x, w = randn(1, 1, k, dtype=dtype, device=DEVICE), randn(n2, k, dtype=dtype, device=DEVICE)
    for bias in (None, randn(n2, dtype=dtype, device=DEVICE)):
        with poisoned_alloc():
            out = gemv_gated(x, w, bias, backend="triton", config=config)
        assert out.shape == (1, 1, n2 // 2) and out.dtype == dtype
        assert_close(out, _swiglu_reference(x, w, bias), what=f"{n2}x{k} {config}")
    assert_close(gemv_gated(x, w, backend="torch"), _swiglu_reference(x, w))
    with pytest.raises(ValueError, match="one row, an even BN"):
        gemv_gated(x, w, backend="triton", config={"BN": 3, "BK": 64})
    with pytest.raises(ValueError, match="one activation row"):
        gemv_gated(x.expand(1, 2, k), w, backend="triton")
    with pytest.raises(ValueError, match="fused gate"):
        gemv_gated(x, w[:-1], backend="triton")


def test_gemv_leading_dims_non_contiguous() -> None:
    x = randn(2, 1, 128, device=DEVICE)[..., ::2]
    w = randn(10, 64, device=DEVICE)
    out = gemv(x, w, backend="triton")
    assert out.shape == (2, 1, 10)
    assert_close(out, gemv_reference(x, w))


def test_gemv_errors() -> None:
    w = randn(8, 64)
    with pytest.raises(ValueError, match="at most"):
        gemv(randn(GEMV_MAX_M + 1, 64), w, backend="triton")
    with pytest.raises(ValueError, match="does not match"):
        gemv(randn(1, 32), w, backend="torch")
    with pytest.raises(TypeError, match="dtype"):
        gemv(randn(1, 64, dtype=torch.float16), w, backend="triton")
    with pytest.raises(ValueError, match="BM=1"):
        gemv(randn(2, 64), w, backend="triton", config={"BM": 1, "BN": 4, "BK": 64})


def test_gemv_nan_propagates() -> None:
    x, w = randn(1, 64, device=DEVICE), randn(8, 64, device=DEVICE)
    w[5, 7] = float("nan")
    out = gemv(x, w, backend="triton")
    assert torch.isnan(out[0, 5]) and torch.isfinite(out[0, :5]).all()
    assert rel_err(out, gemv_reference(x, randn(8, 64, device=DEVICE))) == float("inf")


def test_heuristics() -> None:
    assert pick_block_k(4096, 512) == 512 and pick_block_k(576, 512) == 64 and pick_block_k(100, 512) == 128
    assert pick_split_k(2000, 8, 132) == 1
    for m, n, k in [(1, 4096, 4096), (1, 128256, 4096), (4, 576, 1536), (16, 64, 14336), (1, 8, 100)]:
        cfg = gemv_config(m, n, k)
        assert cfg["BM"] >= m and cfg["BN"] * cfg["BK"] * cfg["BM"] <= 16384
        assert k % cfg["BK"] == 0 or cfg["BK"] >= 64 or cfg["BK"] >= k


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8192, 2048),
                                   (128256, 4096), (1536, 576), (576, 1536), (4864, 896), (896, 4864)], ids=str)
def test_gemv_gpu_real_shapes(shape: tuple) -> None:
    n, k = shape
    w = randn(n, k, dtype=torch.bfloat16, device="cuda", scale=0.02)
    for m in (1, 2, 4, 8, 16):
        x = randn(m, k, dtype=torch.bfloat16, device="cuda")
        with poisoned_alloc():
            out = gemv(x, w, backend="triton")
        assert rel_err(out, gemv_reference(x, w)) < 1e-2, (m, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("n2, k", [(28672, 4096), (16384, 2048), (2 * 4864, 896), (2 * 1536, 576)], ids=str)
def test_gated_gemv_gpu_real_shapes(n2: int, k: int) -> None:
    w = randn(n2, k, dtype=torch.bfloat16, device="cuda", scale=0.02)
    x = randn(1, k, dtype=torch.bfloat16, device="cuda")
    with poisoned_alloc():
        out = gemv_gated(x, w, backend="triton")
    assert rel_err(out, _swiglu_reference(x, w)) < 1e-2
