"""Quantized matmul kernels (w8a16, w4a16) vs dequantize-then-matmul, under TRITON_INTERPRET=1 on tiny shapes
(and natively at real shapes with ``-m gpu`` on a CUDA machine)."""

from __future__ import annotations

import os

if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # in case tests/conftest.py did not set it before kernels import

import pytest
import torch

from kernel_checks import assert_close, poisoned_alloc, randn, rel_err
from policyinject.errors import UnsupportedError
from policyinject.kernels import quant_matmul as qm
from policyinject.kernels._common import triton_launchable
from policyinject.kernels.quant_heuristics import DEQUANT_MIN_M, _quant_matmul_config
from policyinject.kernels.quant_reference import quant_matmul_reference
from policyinject.kernels.quantize import QuantizedWeight, dequantize_weight, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, group_size) -- K covers the built-in architectures' shape classes: powers of two, 576 and 1536
# (SmolLM2), 896 (Qwen2.5-0.5B), a per-channel K with no power-of-two divisor >= 64 (masked tail).
CASES = [
    (1, 24, 64, None),
    (1, 16, 576, 64),
    (1, 8, 576, None),
    (3, 16, 576, 64),
    (2, 8, 896, 128),
    (1, 8, 1536, 128),
    (2, 8, 4864, None),
    (1, 4, 4864, 128),
    (4, 8, 200, None),
    (16, 24, 576, 64),
    (19, 40, 128, None),
    (33, 16, 192, 96),
]


def _check(x, qw, bias, config=None):
    with poisoned_alloc():
        out = qm.quant_matmul(x, qw, bias, backend="triton", config=config)
    ref = quant_matmul_reference(x, qw, bias)
    # also against a float64 dequantize-then-matmul, not only the float32 reference
    w64 = dequantize_weight(qw, torch.float64)
    ref64 = x.double().reshape(-1, qw.in_features) @ w64.t().to(x.device)
    if bias is not None:
        ref64 = ref64 + bias.double()
    assert_close(out, ref, what=f"bits={qw.num_bits} g={qw.group_size} sym={qw.symmetric}")
    assert rel_err(out.reshape(ref64.shape), ref64) < 2e-2
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(bits: int, case: tuple) -> None:
    m, n, k, g = case
    torch.manual_seed(hash((bits, case)) % 2**31)
    sym = (m + n) % 2 == 0
    dtype = [torch.float16, torch.bfloat16, torch.float32][(m + k) % 3]
    qw = quantize_weight(randn(n, k), bits, g, sym).to(DEVICE)
    x = randn(m, k, dtype=dtype, device=DEVICE)
    bias = randn(n, dtype=dtype, device=DEVICE) if m % 2 else None
    _check(x, qw, bias)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtypes_and_asymmetric(bits: int, symmetric: bool, dtype: torch.dtype) -> None:
    qw = quantize_weight(randn(12, 256) + 0.3, bits, 64, symmetric).to(DEVICE)
    for m in (1, 20):
        _check(randn(m, 256, dtype=dtype, device=DEVICE), qw, randn(12, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "config",
    [
        {"kernel": "gemv", "BM": 1, "BN": 4, "GPB": 2, "GK": 32, "split_k": 3},
        {"kernel": "gemv", "BM": 4, "BN": 2, "GPB": 1, "GK": 64, "split_k": 2},
        {"kernel": "gemm", "BM": 16, "BN": 16, "BK": 32, "split_k": 2},
        {"kernel": "gemm", "BM": 16, "BN": 32, "BK": 64, "split_k": 1},
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_explicit_configs_and_split_k(bits: int, config: dict) -> None:
    qw = quantize_weight(randn(20, 384), bits, 64, symmetric=bits == 8).to(DEVICE)
    m = 1 if config.get("BM") == 1 else 3
    _check(randn(m, 384, device=DEVICE), qw, randn(20, device=DEVICE), config)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group, bk, split_k", [(32, 64, 1), (32, 128, 2), (16, 64, 1)])
def test_gemm_k_steps_spanning_several_groups(bits: int, symmetric: bool, group: int, bk: int, split_k: int) -> None:
    """Prefill GEMM with a K step of several groups (each weight scaled before the dot): the int4 default's
    group 32 no longer forces 32-wide K steps."""
    if bits == 4 and group < 32:
        pytest.skip("int4 takes groups that are a multiple of 32")
    qw = quantize_weight(randn(40, 512), bits, group, symmetric=symmetric).to(DEVICE)
    config = {"kernel": "gemm", "BM": 16, "BN": 16, "BK": bk, "split_k": split_k}
    _check(randn(19, 512, device=DEVICE), qw, randn(40, device=DEVICE), config)
    _check(randn(6, 512, dtype=torch.bfloat16, device=DEVICE), qw, None, config)


def test_gemm_heuristic_takes_several_groups_per_k_step() -> None:
    assert _quant_matmul_config(128, 4096, 4096, 4, 32, 132, False)["BK"] == 128  # 4 groups per step
    assert qm.quant_matmul_config(16, 4096, 4096, 4, 32, 132, False)["BK"] == 256
    assert _quant_matmul_config(128, 4096, 4096, 4, 128, 132, False)["BK"] == 128  # one group
    # M = 512 takes the dequantize + cuBLAS path now; the gemm tiles it would have had:
    assert _quant_matmul_config(512, 4096, 4096, 8, 128, 132, False)["BK"] == 64  # inside one group
    assert _quant_matmul_config(512, 4096, 4096, 8, 32, 132, False)["BK"] == 64  # two int8 groups
    assert _quant_matmul_config(128, 3072, 3072, 4, 96, 132, False)["BK"] == 32  # 96: no power-of-two multiple


def test_prefill_gemm_tiles() -> None:
    """64 weight rows per tile (int8: 128 while that fills the SMs); 128 activation rows unless that leaves
    SMs idle (then 64); K steps of 128 (int4) or 64 (int8)."""
    big = _quant_matmul_config(512, 28672, 4096, 4, 32, 132, False)  # the tile below the dequant threshold
    assert (big["BM"], big["BN"], big["BK"], big["num_warps"]) == (128, 64, 128, 4)
    small_grid = _quant_matmul_config(128, 4096, 14336, 8, 14336, 132, False)  # dequant takes it now
    assert (small_grid["BM"], small_grid["BN"], small_grid["BK"]) == (64, 64, 64)
    wide_int8 = qm.quant_matmul_config(128, 28672, 4096, 8, 4096, 132, False)
    assert (wide_int8["BM"], wide_int8["BN"]) == (128, 128)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m, n, k, group", [(5, 24, 576, 64), (3, 40, 200, None), (7, 33, 384, 32), (2, 8, 512, 128)])
def test_dequant_then_cublas(bits: int, symmetric: bool, m: int, n: int, k: int, group) -> None:
    """The large-M path: the weight dequantized into a scratch matrix (``_dequant_kernel``: ragged N and K,
    groups, zero points), then ``F.linear``."""
    if bits == 4 and group is not None and group % 32:
        pytest.skip("int4 takes groups that are a multiple of 32")
    qw = quantize_weight(randn(n, k) + 0.2, bits, group, symmetric).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        _check(randn(m, k, dtype=dtype, device=DEVICE), qw, randn(n, dtype=dtype, device=DEVICE),
               {"kernel": "dequant"})
    from policyinject.kernels._dequant_triton import dequantize_into

    with poisoned_alloc():
        out = dequantize_into(qw, torch.empty(n, k, device=DEVICE), bn=8, bk=64)
    assert torch.equal(out, dequantize_weight(qw, torch.float32).to(out.device))


def test_dequant_threshold() -> None:
    for bits in (8, 4):
        t = DEQUANT_MIN_M[bits]
        assert qm.quant_matmul_config(t, 28672, 4096, bits, 4096 if bits == 8 else 32, 132, False) == \
            {"kernel": "dequant"}
        assert qm.quant_matmul_config(t - 1, 28672, 4096, bits, 4096 if bits == 8 else 32, 132, False)["kernel"] \
            == "gemm"
        assert qm.quant_matmul_config(t, 4096, 4096, bits, 64, 132, True)["kernel"] != "dequant"  # interpreter
    # short weights switch earlier than tall ones (gate|up keeps the tiled kernel at M = 128)
    assert qm.quant_matmul_config(128, 4096, 14336, 8, 14336, 132, False) == {"kernel": "dequant"}
    assert qm.quant_matmul_config(128, 28672, 4096, 8, 4096, 132, False)["kernel"] == "gemm"


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "group, config",
    [
        (64, {"kernel": "q4gemv", "BN": 4, "GPB": 2, "GK": 32, "split_k": 1}),
        (64, {"kernel": "q4gemv", "BN": 2, "GPB": 1, "GK": 64, "split_k": 3, "word_loads": True}),
        (128, {"kernel": "q4gemv", "BN": 8, "GPB": 2, "GK": 64, "split_k": 2}),
        (None, {"kernel": "q4gemv", "BN": 4, "GPB": 2, "GK": 32, "split_k": 2, "word_loads": True}),
    ],
    ids=lambda c: c if not isinstance(c, dict) else "-".join(f"{k}{v}" for k, v in c.items() if k != "kernel"),
)
def test_int4_word_gemv(m: int, symmetric: bool, group, config: dict) -> None:
    """The int32-word int4 GEMV (nibbles unpacked into float bits, group scale per word) on fresh inputs:
    grouped and per-channel, symmetric and not, 1..4 rows, split K, both weight-load layouts, bias."""
    k = 384
    qw = quantize_weight(randn(20, k) + (0 if symmetric else 0.2), 4, group, symmetric).to(DEVICE)
    for dtype in (torch.float16, torch.bfloat16):
        x = randn(m, k, dtype=dtype, device=DEVICE)
        _check(x, qw, randn(20, dtype=dtype, device=DEVICE) if m % 2 else None, dict(config, BM=1 << (m - 1).bit_length()))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m, k, split_k, vec", [(1, 384, 1, 8), (1, 416, 2, 16), (3, 384, 2, 8), (2, 416, 1, 16),
                                                (1, 512, 1, 16)])
def test_layout_matched_int8_gemv(symmetric: bool, m: int, k: int, split_k: int, vec: int) -> None:
    """The q8gemv kernel (int8 per output channel, zero point folded into the offset) on fresh inputs:
    symmetric and asymmetric, 1..3 rows, 8 or 16 bytes per thread, a masked K tail, split K, bias, 16-bit
    activations."""
    qw = quantize_weight(randn(20, k) + (0 if symmetric else 0.3), 8, None, symmetric).to(DEVICE)
    for dtype in (torch.float16, torch.bfloat16):
        x = randn(m, k, dtype=dtype, device=DEVICE)
        cfg = {"kernel": "q8gemv", "BM": 1 << (m - 1).bit_length(), "BN": 4, "BK": 128, "VEC": vec,
               "split_k": split_k}
        _check(x, qw, randn(20, dtype=dtype, device=DEVICE), cfg)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n2, k, bn", [(40, 256, 4), (38, 200, 2)])
def test_gated_int8_gemv_kernel(symmetric: bool, with_bias: bool, n2: int, k: int, bn: int) -> None:
    """q8gemv with the SwiGLU epilogue (gate row j and up row I + j in one program) vs dequantize-then-matmul
    then silu(gate) * up in float32: ragged I, a masked K tail, bias, outputs poisoned with NaN first."""
    from policyinject.kernels import reference

    qw = quantize_weight(randn(n2, k) + (0 if symmetric else 0.3), 8, None, symmetric).to(DEVICE)
    x = randn(1, k, dtype=torch.bfloat16, device=DEVICE)
    bias = randn(n2, dtype=torch.bfloat16, device=DEVICE) if with_bias else None
    cfg = {"kernel": "q8gemv", "BM": 1, "BN": bn, "BK": 128, "VEC": 8, "split_k": 1}
    from policyinject.kernels import _quant_launch_triton as launch

    with poisoned_alloc():
        out = launch.launch_q8gemv(x, qw, bias, cfg, gated=True)
    ref = reference.gated_act(quant_matmul_reference(x.float(), qw, None if bias is None else bias.float()), "silu")
    assert out.shape == (1, n2 // 2)
    assert rel_err(out, ref) < 1e-2
    with pytest.raises(ValueError, match="gated q8gemv"):
        launch.launch_q8gemv(x, qw, bias, dict(cfg, BN=3), gated=True)


def test_int8_batch_1_takes_the_layout_matched_kernel() -> None:
    for n, k in [(4096, 14336), (6144, 4096), (28672, 4096), (128256, 4096), (576, 1536), (896, 4864)]:
        cfg = qm.quant_matmul_config(1, n, k, 8, k, 132, False)
        assert cfg["kernel"] == "q8gemv" and cfg["BK"] % cfg["VEC"] == 0
        assert cfg["BN"] * cfg["BK"] // cfg["VEC"] >= 32 * cfg["num_warps"]  # every thread holds its own bytes
    assert qm.quant_matmul_config(1, 28672, 4096, 8, 4096, 132, False)["BN"] == 4  # tall: 4 rows per program
    assert qm.quant_matmul_config(1, 4096, 4096, 8, 4096, 132, True)["kernel"] == "gemv"  # interpreter: heuristic
    assert qm.quant_matmul_config(1, 4096, 4096, 8, 128, 132, False)["kernel"] == "gemv"  # int8 groups
    with pytest.raises(ValueError, match="q8gemv"):
        qm.quant_matmul(randn(1, 64, device=DEVICE), quantize_weight(randn(8, 64), 8, 32).to(DEVICE),
                        backend="triton", config={"kernel": "q8gemv", "BN": 4, "BK": 64})


def test_int4_word_gemv_takes_a_few_rows_and_unaligned_k() -> None:
    cfg = qm.quant_matmul_config(2, 4096, 4096, 4, 128, 132, False)
    assert cfg["kernel"] == "q4gemv" and cfg["GK"] == 128
    assert qm.quant_matmul_config(1, 1536, 576, 4, 64, 132, False)["kernel"] == "q4gemv"  # K not a multiple of 128
    assert qm.quant_matmul_config(8, 4096, 4096, 4, 128, 132, False)["kernel"] == "gemm"
    assert qm.quant_matmul_config(1, 3072, 2048, 8, 2048, 132, False)["kernel"] == "q8gemv"


def test_int4_default_group_takes_the_tensor_core_gemv_at_batch_1() -> None:
    """Group 32 (the int4 default) at batch 1 with K a multiple of 128: the Gluon tensor-core GEMV; not
    under the interpreter, not for several rows, not where K has no 128 divisor (SmolLM2's 576)."""
    from policyinject.kernels._q4mma_gluon import q4mma_layout_lanes

    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096), (2048, 8192),
                 (4864, 896), (896, 4864), (4096, 1152)]:
        cfg = qm.quant_matmul_config(1, n, k, 4, 32, 132, False)
        assert cfg["kernel"] == "q4mma", (n, k, cfg)
        assert k % (cfg["NQ"] * 128) == 0 and cfg["BN"] % 2 == 0
        # the tile fills the layout: no lane holds a replica (the MMA quads would sum it twice)
        assert cfg["BN"] // 2 >= q4mma_layout_lanes(cfg["NQ"])[0] * cfg["num_warps"], cfg
    assert qm.quant_matmul_config(1, 4096, 14336, 4, 32, 132, False)["split_k"] == 1  # measured: no split
    assert qm.quant_matmul_config(1, 4096, 4096, 4, 32, 132, True)["kernel"] != "q4mma"
    assert qm.quant_matmul_config(2, 4096, 4096, 4, 32, 132, False)["kernel"] == "q4gemv"
    assert qm.quant_matmul_config(1, 1536, 576, 4, 32, 132, False)["kernel"] == "q4gemv"
    assert qm.quant_matmul_config(1, 4096, 4096, 4, 128, 132, False)["kernel"] == "q4mma"
    assert qm.quant_matmul_config(1, 4096, 4096, 4, 4096, 132, False)["kernel"] == "q4mma"  # per channel


def test_tensor_core_gemv_config_errors_are_clear() -> None:
    qw = quantize_weight(randn(64, 256), 4, 32).to(DEVICE)
    x = randn(1, 256, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises((UnsupportedError, ValueError), match="q4mma"):
        qm.quant_matmul(x, qw, backend="triton", config={"kernel": "q4mma", "BN": 32, "NQ": 2})
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="q4mma"):  # 2 rows; the kernel takes one
            qm.quant_matmul(randn(2, 256, dtype=torch.bfloat16, device=DEVICE), qw, backend="triton",
                            config={"kernel": "q4mma", "BN": 32, "NQ": 2})


def test_per_channel_split_k_with_masked_tail() -> None:
    qw = quantize_weight(randn(8, 200), 8, None).to(DEVICE)
    _check(randn(1, 200, device=DEVICE), qw, None, {"kernel": "gemv", "BN": 4, "GPB": 1, "GK": 64, "split_k": 2})
    _check(randn(2, 200, device=DEVICE), qw, None, {"kernel": "gemm", "BM": 16, "BN": 16, "BK": 32, "split_k": 3})


def test_leading_dims_and_non_contiguous_input() -> None:
    qw = quantize_weight(randn(16, 128), 4, 64).to(DEVICE)
    x = randn(2, 3, 256, device=DEVICE)[..., ::2]  # stride 2 along K
    out = qm.quant_matmul(x, qw, backend="triton")
    assert out.shape == (2, 3, 16)
    assert_close(out, quant_matmul_reference(x, qw))


def test_empty_batch() -> None:
    qw = quantize_weight(randn(16, 64), 8).to(DEVICE)
    assert qm.quant_matmul(randn(0, 64, device=DEVICE), qw, backend="triton").shape == (0, 16)


def test_nan_in_input_propagates() -> None:
    qw = quantize_weight(randn(8, 64), 8).to(DEVICE)
    x = randn(1, 64, device=DEVICE)
    x[0, 3] = float("nan")
    out = qm.quant_matmul(x, qw, backend="triton")
    assert torch.isnan(out).all()
    assert rel_err(out, quant_matmul_reference(randn(1, 64, device=DEVICE), qw)) == float("inf")


def _from_raw(qweight: torch.Tensor, scales: torch.Tensor, zeros, num_bits: int) -> QuantizedWeight:
    """A weight rebuilt from its raw tensors alone (int8 ``[N, K]`` or packed int4 ``[N, K // 2]``, scales
    and zeros ``[N, groups]``): the group size and shapes follow from the tensors."""
    in_features = qweight.shape[1] * (2 if num_bits == 4 else 1)
    return QuantizedWeight(qweight=qweight, scales=scales, zeros=zeros, num_bits=num_bits,
                           group_size=in_features // scales.shape[1], in_features=in_features,
                           out_features=qweight.shape[0])


def test_weight_rebuilt_from_raw_tensors() -> None:
    w = randn(8, 128)
    q8, q4 = quantize_weight(w, 8, 64), quantize_weight(w, 4, 64, symmetric=False)
    x = randn(1, 128)
    assert_close(qm.quant_matmul(x, _from_raw(q8.qweight, q8.scales, None, 8), backend="torch"),
                 quant_matmul_reference(x, q8))
    assert_close(qm.quant_matmul(x, _from_raw(q4.qweight, q4.scales, q4.zeros, 4), backend="torch"),
                 quant_matmul_reference(x, q4))
    if DEVICE == "cpu":
        assert_close(qm.quant_matmul(x, _from_raw(q4.qweight, q4.scales, q4.zeros, 4), backend="triton"),
                     quant_matmul_reference(x, q4))


def test_auto_backend_on_cpu_is_reference() -> None:
    qw = quantize_weight(randn(8, 64), 4, 32)
    x = randn(2, 64)
    assert torch.equal(qm.quant_matmul(x, qw), quant_matmul_reference(x, qw))
    with pytest.raises(ValueError, match="backend must be"):
        qm.quant_matmul(x, qw, backend="cuda")


def test_unsupported_group_size_is_a_clear_error() -> None:
    qw = quantize_weight(randn(8, 96), 4, 24)
    with pytest.raises(UnsupportedError, match="group_size=24"):
        qm.quant_matmul(randn(1, 96), qw, backend="triton")
    assert qm.quant_matmul(randn(1, 96), qw, backend="torch").shape == (1, 8)


def test_feature_mismatch() -> None:
    with pytest.raises(ValueError, match="in_features=64"):
        qm.quant_matmul(randn(1, 32), quantize_weight(randn(8, 64), 8), backend="torch")


def test_launch_without_gpu_or_interpreter_is_a_clear_error() -> None:
    class FakeJit:  # stands for a compiled (non-interpreted) kernel on a CPU-only machine
        pass

    with pytest.raises(UnsupportedError, match="needs CUDA tensors"):
        triton_launchable(FakeJit(), torch.zeros(1))


@pytest.mark.parametrize(
    "m, n, k, g, bits",
    [(1, 4, 64, 32, 4), (1, 8, 576, None, 4), (1, 8, 4096, 128, 4), (2, 8, 1024, None, 8), (8, 8, 64, 32, 8)],
)
def test_heuristic_configs_are_valid(m, n, k, g, bits) -> None:
    g = g or k
    for interpret in (True, False):
        cfg = qm.quant_matmul_config(m, n, k, bits, g, 132, interpret)
        if cfg["kernel"] == "q4mma":
            assert not interpret and m == 1 and bits == 4 and k % (cfg["NQ"] * 128) == 0
            continue
        step = cfg["GPB"] * cfg["GK"] if cfg["kernel"] in ("gemv", "q4gemv") else cfg["BK"]
        assert g == k or g % step == 0 or step % g == 0
        if cfg["kernel"] == "q4gemv":
            assert bits == 4 and g % cfg["GK"] == 0 and cfg["GK"] % 8 == 0
        if cfg["kernel"] in ("gemv", "q4gemv"):
            assert cfg["BM"] >= m
            assert g == k or k % step == 0  # grouped weights never need a K mask


# --- real shapes on a GPU --------------------------------------------------------------------------------

GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (8192, 2048), (2048, 8192), (1536, 576),
              (576, 1536), (4864, 896), (896, 4864)]


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128, None], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("n, k", [(1000, 2048), (300, 4096), (4096, 1152), (2048, 8192)], ids=str)
def test_gpu_tensor_core_int4_gemv(n: int, k: int, group, symmetric: bool) -> None:
    """The Gluon int4 GEMV against dequantize-then-matmul: every group size it takes, both zero-point
    modes, ragged N, bias, several tile shapes and K splits, outputs poisoned with NaN first."""
    qw = quantize_weight(randn(n, k, device="cuda", scale=0.02), 4, group or k, symmetric=symmetric)
    x = randn(1, k, dtype=torch.bfloat16, device="cuda")
    bias = randn(n, dtype=torch.bfloat16, device="cuda")
    ref = quant_matmul_reference(x, qw, bias)
    configs = [None] + [{"kernel": "q4mma", "BN": bn, "NQ": nq, "split_k": sk}
                        for bn, nq, sk in [(32, 2, 1), (64, 1, 2), (32, 4, 4), (128, 2, 1), (16, 8, 1)]
                        if k % (nq * 128) == 0]
    for cfg in configs:
        with poisoned_alloc():
            out = qm.quant_matmul(x, qw, bias, backend="triton", config=cfg)
        assert rel_err(out, ref) < 1e-2, cfg
    assert qm.quant_matmul_config(1, n, k, 4, qw.group_size, 132, False)["kernel"] in ("q4mma", "q4gemv")


def test_gated_int4_matmul_is_none_where_no_fused_kernel_applies() -> None:
    for bits in (4, 8):
        qw = quantize_weight(randn(64, 256), bits, 32 if bits == 4 else None)
        assert qm.quant_gated_matmul(randn(1, 256), qw, "silu") is None  # CPU tensors


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n2, k", [(28672, 4096), (2 * 4864, 896), (2000, 2048), (2 * 1536, 576)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gpu_gated_int8_gemv_matches_gemv_then_swiglu(n2: int, k: int, symmetric: bool, with_bias: bool) -> None:
    """int8 gate|up GEMV with the SwiGLU epilogue (the heuristic's tile) vs dequantize-then-matmul then
    silu(gate) * up in float32, bf16 and fp16 activations."""
    from policyinject.kernels import reference

    qw = quantize_weight(randn(n2, k, device="cuda", scale=0.02), 8, None, symmetric=symmetric)
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(1, k, dtype=dtype, device="cuda")
        bias = randn(n2, dtype=dtype, device="cuda") if with_bias else None
        with poisoned_alloc():
            out = qm.quant_gated_matmul(x, qw, "silu", bias)
        assert out is not None and out.shape == (1, n2 // 2) and out.dtype == dtype
        ref = reference.gated_act(quant_matmul_reference(x.float(), qw, None if bias is None else bias.float()),
                                  "silu")
        assert rel_err(out, ref) < 1e-2
    assert qm.quant_gated_matmul(x.expand(2, k), qw, "silu") is None  # two rows


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric, group", [(False, 32), (True, 128)], ids=["asym-g32", "sym-g128"])
@pytest.mark.parametrize("n2, k", [(28672, 4096), (2 * 4864, 896), (2000, 2048)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gpu_gated_int4_gemv_matches_gemv_then_swiglu(n2: int, k: int, symmetric: bool, group: int,
                                                     with_bias: bool) -> None:
    """gate|up GEMV with the SwiGLU epilogue vs dequantize-then-matmul then silu(gate) * up in float32."""
    from policyinject.kernels import reference

    qw = quantize_weight(randn(n2, k, device="cuda", scale=0.02), 4, group, symmetric=symmetric)
    x = randn(1, k, dtype=torch.bfloat16, device="cuda")
    bias = randn(n2, dtype=torch.bfloat16, device="cuda") if with_bias else None
    with poisoned_alloc():
        out = qm.quant_gated_matmul(x, qw, "silu", bias)
    if qm.quant_matmul_config(1, n2, k, 4, group, 132, False)["kernel"] != "q4mma":
        assert out is None  # the CUDA-core kernel measured faster here: GEMV, then the activation kernel
        return
    assert out is not None and out.shape == (1, n2 // 2) and out.dtype == torch.bfloat16
    ref = reference.gated_act(quant_matmul_reference(x.float(), qw, None if bias is None else bias.float()), "silu")
    assert rel_err(out, ref) < 1e-2
    assert qm.quant_gated_matmul(x.half(), qw, "silu") is None  # fp16 activations: GEMV, then the activation
    assert qm.quant_gated_matmul(x, qw, "gelu_tanh") is None
    assert qm.quant_gated_matmul(x.expand(2, k), qw, "silu") is None  # two rows


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8, 16], ids=lambda b: f"int{b}" if b < 16 else "bf16")
def test_gpu_injected_mlp_gate_up_fuses_the_activation(bits: int) -> None:
    """InjectedMLP on an int4 / int8 gate|up QuantLinear or a 16-bit DecodeLinear: the fused decode path equals
    GEMV + gated activation; prefill rows (several) take the unfused path."""
    from policyinject.modules import _ops
    from policyinject.modules.fast_linear import DecodeLinear
    from policyinject.modules.mlp import InjectedMLP
    from policyinject.modules.quant_linear import QuantLinear

    def make(n: int, k: int) -> torch.nn.Module:
        lin = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        if bits == 16:
            return DecodeLinear.from_linear(lin).cuda()
        return QuantLinear.from_linear(lin, num_bits=bits).cuda()

    up, down = make(2 * 5632, 2048), make(2048, 5632)
    mlp = InjectedMLP(up, down, "silu", gated=True)
    x = randn(1, 1, 2048, dtype=torch.bfloat16, device="cuda")
    assert up.gated(x, "silu") is not None
    assert up.gated(x.expand(1, 3, 2048), "silu") is None
    unfused = down(_ops.gated_act(up(x), "silu", "auto"))
    assert rel_err(mlp(x), unfused) < 2e-2


@pytest.mark.gpu
def test_gpu_tensor_core_gemv_falls_back_for_16_bit_float_activations() -> None:
    """fp16 / fp32 activations take the CUDA-core kernels (the tensor-core GEMV is bf16 only)."""
    qw = quantize_weight(randn(4096, 4096, device="cuda", scale=0.02), 4, 32, symmetric=False)
    for dtype in (torch.float16, torch.float32):
        x = randn(1, 4096, dtype=dtype, device="cuda")
        assert rel_err(qm.quant_matmul(x, qw, backend="triton"), quant_matmul_reference(x, qw)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group", [(8, None), (4, 128), (4, None), (4, 32)])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_real_shapes(bits: int, group, shape: tuple) -> None:
    n, k = shape
    if group is not None and k % group:
        group = 64 if k % 64 == 0 else 32  # e.g. SmolLM2's 576: group 128 does not divide it
    qw = quantize_weight(randn(n, k, device="cuda", scale=0.02), bits, group)
    for m in (1, 3, 16, 100):
        x = randn(m, k, dtype=torch.bfloat16, device="cuda")
        with poisoned_alloc():
            out = qm.quant_matmul(x, qw, backend="triton")
        ref = quant_matmul_reference(x, qw)
        assert rel_err(out, ref) < 1e-2, (m, shape, bits, group)


@pytest.mark.gpu
@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (8, None, False), (4, 32, False),
                                                     (4, 128, True), (4, None, False)], ids=str)
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336), (1000, 2048), (300, 1152)], ids=str)
def test_gpu_dequant_then_cublas(bits: int, group, symmetric: bool, n: int, k: int) -> None:
    """The large-M path at real shapes: the heuristic takes it at M = 512, the scratch weight equals the
    reference dequantization, the product equals dequantize-then-matmul (outputs poisoned first)."""
    from policyinject.kernels._dequant_triton import dequantize_into

    qw = quantize_weight(randn(n, k, device="cuda", scale=0.02), bits, group or k, symmetric=symmetric)
    assert qm.quant_matmul_config(512, n, k, bits, qw.group_size, 132, False) == {"kernel": "dequant"}
    with poisoned_alloc():
        w = dequantize_into(qw, torch.empty(n, k, device="cuda"))
    assert torch.equal(w, dequantize_weight(qw, torch.float32))
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(512, k, dtype=dtype, device="cuda")
        _check(x, qw, randn(n, dtype=dtype, device="cuda"))
