"""Triton gated-activation kernel vs the PyTorch references, on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import warnings

import pytest
import torch

from kernel_checks import DTYPES, assert_close, poisoned_alloc, randn
from policyinject.errors import UnsupportedError
from policyinject.kernels import activations as A
from policyinject.kernels import reference
from policyinject.kernels.activations import ActConfig, act_config, launch_gated_act

SHAPES = [(1, 8), (3, 5, 100), (7, 300), (2, 1, 33)]


@pytest.fixture(autouse=True)
def _quiet_exp_overflow():
    # The interpreter evaluates sigmoid with numpy; exp overflow for very negative inputs is the correct limit.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="overflow encountered in exp", category=RuntimeWarning)
        yield


@pytest.mark.parametrize("fn", ["swiglu", "geglu_tanh", "geglu_exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_separate_gate_up(fn: str, dtype: torch.dtype, shape: tuple) -> None:
    gate, up = randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype)
    call = {
        "swiglu": lambda be: A.swiglu(gate, up, backend=be),
        "geglu_tanh": lambda be: A.geglu(gate, up, "tanh", backend=be),
        "geglu_exact": lambda be: A.geglu(gate, up, "none", backend=be),
    }[fn]
    with poisoned_alloc():
        out = call("triton")
    assert_close(out, call("torch"))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu", "gelu_pytorch_tanh", "swish"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_gate_up(activation: str, dtype: torch.dtype) -> None:
    gate_up = randn(2, 3, 2 * 72, dtype=dtype, scale=3.0)
    with poisoned_alloc():
        out = A.gated_act(gate_up, activation, backend="triton")
    ref = reference.gated_act(gate_up, activation)
    assert out.shape == (2, 3, 72)
    assert_close(out, ref)


def test_fused_matches_separate() -> None:
    gate_up = randn(4, 2 * 50)
    fused = A.gated_act(gate_up, "gelu_tanh", backend="triton")
    sep = A.geglu(gate_up[:, :50], gate_up[:, 50:], "tanh", backend="triton")
    assert_close(fused, sep)


def test_non_contiguous_inputs() -> None:
    gate = randn(40, 6).t()  # column-major, copied once
    up = randn(6, 80)[:, ::2]  # strided columns, copied once
    with poisoned_alloc():
        out = A.swiglu(gate, up, backend="triton")
    assert_close(out, reference.swiglu(gate, up))


@pytest.mark.parametrize("config", [ActConfig(4, 16, 1), ActConfig(1, 64, 2), ActConfig(8, 8, 1)], ids=str)
def test_launch_configs(config: ActConfig) -> None:
    """Tiles that do not divide the shape (10 x 70): row and column masks."""
    gate, up = randn(10, 70, dtype=torch.bfloat16), randn(10, 70, dtype=torch.bfloat16)
    with poisoned_alloc():
        out = launch_gated_act(gate, up, "silu", config)
    assert_close(out, reference.swiglu(gate, up))


def test_act_config_heuristics() -> None:
    assert act_config(4096, 14336) == ActConfig(block_m=2, block_n=2048)
    cfg = act_config(1, 14336)
    assert cfg.block_m == 1 and cfg.block_n == 2048
    assert act_config(64, 100).block_n == 128


def test_errors_and_auto() -> None:
    gate, up = randn(2, 8), randn(2, 8)
    with pytest.raises(ValueError, match="unknown gated activation"):
        A.gated_act(torch.cat([gate, up], -1), "relu6", backend="triton")
    with pytest.raises(ValueError, match="even"):
        A.gated_act(randn(2, 7), "silu", backend="triton")
    with pytest.raises(ValueError, match="approximate"):
        A.geglu(gate, up, "erf", backend="torch")
    with pytest.raises(ValueError, match="differ"):
        A.swiglu(gate, randn(2, 4), backend="triton")
    with pytest.raises(UnsupportedError, match="float64"):
        A.swiglu(gate.double(), up.double(), backend="triton")
    assert torch.equal(A.swiglu(gate, up), reference.swiglu(gate, up))  # auto on CPU
