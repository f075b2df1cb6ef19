"""HQQ and GPTQ weight quantization: same stored format as round-to-nearest, never worse where they aim."""

from __future__ import annotations

import pytest
import torch

from policyinject.kernels.quant_search import HessianAccumulator, gptq_quantize_weight, hqq_quantize_weight
from policyinject.kernels.quantize import dequantize_weight, qrange, quantize_weight, unpack_int4


def _heavy_tailed(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    # Student-t-like tails: a few large weights per row, plus some shifted rows
    mask = torch.rand(n, k, generator=g) < 0.01
    w = w + mask * torch.randn(n, k, generator=g) * 0.3
    return w + (torch.rand(n, 1, generator=g) < 0.2) * 0.03


def _inputs(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 30.0  # a few outlier channels, as in real activations
    return x @ (torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / k ** 0.5)


def _check_format(qw, w: torch.Tensor, bits: int, group: int, symmetric: bool) -> None:
    n, k = w.shape
    assert (qw.out_features, qw.in_features, qw.group_size, qw.num_bits) == (n, k, group, bits)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (n, k // group)
    assert bool((qw.scales.float() > 0).all()) and bool(torch.isfinite(qw.scales.float()).all())
    if bits == 4:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, k // 2)
        q = unpack_int4(qw.qweight)
    else:
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (n, k)
        q = qw.qweight
    lo, hi = qrange(bits, symmetric)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    if symmetric:
        assert qw.zeros is None
    else:
        assert qw.zeros.dtype == torch.float16 and qw.zeros.shape == qw.scales.shape
        assert bool(torch.isfinite(qw.zeros.float()).all())
    assert bool(torch.isfinite(dequantize_weight(qw)).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (4, 128), (8, 64)])
def test_hqq_format_and_never_worse_than_rtn_in_l1(seed: int, bits: int, group: int) -> None:
    w = _heavy_tailed(48, 256, seed)
    qh = hqq_quantize_weight(w, bits, group)
    _check_format(qh, w, bits, group, symmetric=False)
    qr = quantize_weight(w, bits, group, symmetric=False)
    # HQQ keeps RTN's scales and starts from its zero points, keeping the best per group by mean |error|
    assert torch.equal(qh.scales, qr.scales)
    e_h = (dequantize_weight(qh) - w).abs().reshape(48, -1, group).mean(-1)
    e_r = (dequantize_weight(qr) - w).abs().reshape(48, -1, group).mean(-1)
    assert bool((e_h <= e_r * (1 + 1e-3) + 1e-9).all())
    if bits == 4:  # int8's zero point is an integer: usually nothing to move
        assert float(e_h.sum()) < float(e_r.sum())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, False), (4, 128, True), (8, 256, True)])
def test_gptq_format_and_output_error_below_rtn(seed: int, bits: int, group: int, symmetric: bool) -> None:
    n, k = 40, 256
    w = _heavy_tailed(n, k, seed)
    x_all = _inputs(3072, k, seed + 10)
    x, x_test = x_all[:2048], x_all[2048:]  # calibrate on one draw, measure on a fresh one of the same inputs
    acc = HessianAccumulator(k)
    acc.add(x[:1000])
    acc.add(x[1000:].reshape(4, -1, k))
    assert acc.count == 2048
    qg = gptq_quantize_weight(w, acc.hessian, bits, group, symmetric)
    _check_format(qg, w, bits, group, symmetric)
    qr = quantize_weight(w, bits, group, symmetric)
    ref = x_test @ w.T
    err_g = float((x_test @ dequantize_weight(qg).T - ref).norm() / ref.norm())
    err_r = float((x_test @ dequantize_weight(qr).T - ref).norm() / ref.norm())
    assert err_g < err_r


def test_gptq_identity_hessian_is_close_to_rtn() -> None:
    w = _heavy_tailed(16, 128, 3)
    qg = gptq_quantize_weight(w, torch.eye(128), 4, 32)
    qr = quantize_weight(w, 4, 32)
    # no correlation between inputs: nothing to compensate, GPTQ is round-to-nearest
    assert torch.equal(qg.qweight, qr.qweight) and torch.equal(qg.scales, qr.scales)


def test_gptq_dead_inputs_and_zero_rows() -> None:
    w = _heavy_tailed(8, 64, 4)
    w[3] = 0.0
    x = torch.randn(256, 64)
    x[:, 5] = 0.0  # an input that never fires
    _check_format(gptq_quantize_weight(w, x.T @ x, 4, 32, symmetric=False), w, 4, 32, symmetric=False)
    qg = gptq_quantize_weight(w, x.T @ x, 4, 32, symmetric=True)  # symmetric: 0 is exact
    assert float(dequantize_weight(qg)[3].abs().max()) == 0.0
    assert float(dequantize_weight(qg)[:, 5].abs().max()) == 0.0


@pytest.mark.parametrize("fn", ["hqq", "gptq", "rtn"])
def test_nan_and_inf_never_pass(fn: str) -> None:
    for bad in (float("nan"), float("inf")):
        w = torch.randn(8, 64)
        w[2, 7] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            if fn == "hqq":
                hqq_quantize_weight(w, 4, 32)
            elif fn == "gptq":
                gptq_quantize_weight(w, torch.eye(64), 4, 32)
            else:
                quantize_weight(w, 4, 32)
    h = torch.eye(64)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(torch.randn(8, 64), h, 4, 32)


def test_gptq_rejects_wrong_hessian_shape() -> None:
    with pytest.raises(ValueError, match=r"hessian must be \[64, 64\]"):
        gptq_quantize_weight(torch.randn(8, 64), torch.eye(32), 4, 32)


@pytest.mark.parametrize("name", ["policyinject.kernels.quantize", "policyinject.kernels.quant_search",
                                  "policyinject.passes.quantize"])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 32, False), (8, None, True), (8, 32, False)])
def test_row_blocks_change_nothing(bits: int, group, symmetric: bool) -> None:
    """Quantizing a weight by blocks of rows (which bounds the float32 temporaries of big weights such as an
    output head) gives the same bytes, scales and zero points as quantizing it whole, for round-to-nearest and
    HQQ, including a last block shorter than the others."""
    w = torch.distributions.StudentT(3.0).sample((37, 128))
    for quantize in (quantize_weight, hqq_quantize_weight):
        if quantize is hqq_quantize_weight and symmetric:
            continue
        kwargs = {} if quantize is hqq_quantize_weight else {"symmetric": symmetric}
        whole = quantize(w, bits, group, rows_per_block=37, **kwargs)
        blocks = quantize(w, bits, group, rows_per_block=5, **kwargs)
        assert blocks.out_features == 37 and blocks.qweight.shape == whole.qweight.shape
        assert torch.equal(blocks.qweight, whole.qweight) and torch.equal(blocks.scales, whole.scales)
        assert (blocks.zeros is None) == (whole.zeros is None)
        if whole.zeros is not None:
            assert torch.equal(blocks.zeros, whole.zeros)


def test_default_row_blocks_bound_the_elements() -> None:
    from policyinject.kernels.quantize import CHUNK_ELEMENTS, rows_per_chunk

    assert rows_per_chunk(128256, 4096) * 4096 <= CHUNK_ELEMENTS
    assert rows_per_chunk(3, 64) == 3 and rows_per_chunk(10, CHUNK_ELEMENTS * 2) == 1
