"""Quantization formats: group-size mapping, int4 packing, quantize/dequantize round-trip bounds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policyinject.kernels.quantize import (
    default_group_size,
    dequantize_weight,
    pack_int4,
    qrange,
    quantize_weight,
    resolve_group_size,
    unpack_int4,
)


@pytest.mark.parametrize(
    "k, bits, expected",
    [(4096, 8, 4096), (4096, 4, 32), (576, 4, 32), (1536, 4, 32), (896, 4, 32), (4864, 4, 32),
     (14336, 4, 32), (96, 4, 32), (1000, 4, 1000), (48, 4, 48), (576, 8, 576)],
)
def test_default_group_size(k: int, bits: int, expected: int) -> None:
    assert default_group_size(k, bits) == expected


def test_resolve_group_size_mapping() -> None:
    assert resolve_group_size(4096, 8, q_groups=1) == 4096
    assert resolve_group_size(4096, 8, q_groups=32) == 128
    assert resolve_group_size(576, 4, q_groups=9) == 64
    assert resolve_group_size(576, 4, group_size=32) == 32
    assert resolve_group_size(576, 4, q_groups=2, group_size=64) == 64  # group_size wins
    assert resolve_group_size(576, 8, group_size=-1) == 576


@pytest.mark.parametrize(
    "kwargs, message",
    [({"q_groups": 5}, "in_features=576 is not divisible by q_groups=5"),
     ({"group_size": 100}, "in_features=576 is not divisible by group_size=100"),
     ({"q_groups": 0}, "q_groups=0")],
)
def test_resolve_group_size_errors_name_the_dimension(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_group_size(576, 8, **kwargs)


def test_int4_needs_even_groups() -> None:
    with pytest.raises(ValueError, match="must be even"):
        resolve_group_size(576, 4, q_groups=64)  # group 9


def test_bits_validated() -> None:
    with pytest.raises(ValueError, match="num_bits must be 8 or 4"):
        quantize_weight(torch.randn(4, 32), num_bits=3)


@given(st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0))
@settings(max_examples=50, deadline=None)
def test_pack_unpack_exact(values: list) -> None:
    q = torch.tensor(values, dtype=torch.int8).reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, len(values) // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_pack_layout_low_nibble_first() -> None:
    assert pack_int4(torch.tensor([[1, 2]])).item() == (1 + 8) | ((2 + 8) << 4)
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[9, 0]]))


def _group_bound(qw, w: torch.Tensor) -> torch.Tensor:
    """Per-element bound: half a step, plus the clamp error from rounding the scale to fp16."""
    s = qw.scales.float().repeat_interleave(qw.group_size, dim=1)
    _, qmax = qrange(qw.num_bits, qw.symmetric)
    zero_rounding = 0.0
    if qw.zeros is not None:  # a fractional (4-bit) zero point is stored in fp16: at most half an ulp off
        zero_rounding = qw.zeros.float().abs().repeat_interleave(qw.group_size, dim=1) * 2.0**-11
    return s * (0.5 + (qmax + 1) * 2.0**-10 + zero_rounding) + 1e-7


@given(
    bits=st.sampled_from([8, 4]),
    symmetric=st.booleans(),
    n=st.integers(1, 6),
    groups=st.integers(1, 5),
    group=st.sampled_from([2, 8, 32, 64]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=80, deadline=None)
def test_round_trip_error_bound(bits, symmetric, n, groups, group, scale, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    k = groups * group
    w = torch.randn(n, k, generator=g) * scale
    qw = quantize_weight(w, bits, group, symmetric)
    assert qw.qweight.shape == (n, k if bits == 8 else k // 2)
    assert qw.scales.shape == (n, groups) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == symmetric
    q = qw.qweight if bits == 8 else unpack_int4(qw.qweight)
    qmin, qmax = qrange(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize_weight(qw) - w).abs()
    assert bool((err <= _group_bound(qw, w)).all()), float((err - _group_bound(qw, w)).max())


def test_round_trip_relative_error_by_norm() -> None:
    w = torch.randn(64, 576)
    for bits, group, tol in [(8, None, 0.01), (4, 64, 0.12), (4, 32, 0.11)]:
        for sym in (True, False):
            qw = quantize_weight(w, bits, group, sym)
            err = ((dequantize_weight(qw) - w).norm() / w.norm()).item()
            assert err < tol, (bits, group, sym, err)


def test_asymmetric_handles_shifted_weights_better() -> None:
    w = torch.rand(16, 128) + 0.5  # all positive: symmetric wastes half the range
    e_sym = (dequantize_weight(quantize_weight(w, 4, 32, True)) - w).norm()
    e_asym = (dequantize_weight(quantize_weight(w, 4, 32, False)) - w).norm()
    assert e_asym < 0.75 * e_sym


def test_zero_and_tiny_groups_are_finite() -> None:
    w = torch.zeros(2, 64)
    w[1, :32] = 1e-9
    for bits in (8, 4):
        for sym in (True, False):
            qw = quantize_weight(w, bits, 32, sym)
            assert torch.isfinite(qw.scales.float()).all() and bool((qw.scales.float() > 0).all())
            assert (dequantize_weight(qw) - w).abs().max() < 1e-6


def test_float32_scales_and_bf16_input() -> None:
    w = torch.randn(8, 64).to(torch.bfloat16)
    qw = quantize_weight(w, 8, 32, scale_dtype=torch.float32)
    assert qw.scales.dtype == torch.float32
    assert qw.nbytes() == 8 * 64 + 8 * 2 * 4
    assert ((dequantize_weight(qw) - w.float()).norm() / w.float().norm()) < 0.01


def test_nbytes_counts_weight_scales_and_zeros() -> None:
    qw = quantize_weight(torch.randn(16, 256), 4, 128, symmetric=False)
    assert qw.nbytes() == 16 * 128 + 16 * 2 * 2 + 16 * 2 * 2
