"""The fused MoE kernels at real shapes on a GPU (Mixtral-8x7B: H 4096, I 14336, E 8, k 2; Qwen3-30B-A3B:
H 2048, I 768, E 128, k 8), against the plain-PyTorch reference, and a CUDA-graph capture of the routed block."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from kernel_checks import rel_err  # noqa: E402

from policyinject.kernels.moe import fused_moe, moe_reference, route  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPES = {"mixtral_8x7b": (4096, 14336, 8, 2), "qwen3_30b_a3b": (2048, 768, 128, 8)}


def _weights(name: str, dtype: torch.dtype, seed: int = 0):
    h, i, e, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) / h ** 0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) / i ** 0.5).to(dtype)
    return w13, w2, k, g


@pytest.mark.parametrize("tokens", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_moe_real_shapes(name: str, dtype: torch.dtype, tokens: int) -> None:
    w13, w2, k, g = _weights(name, dtype)
    h, e = w13.shape[2], w13.shape[0]
    x = torch.randn(tokens, h, device="cuda", generator=g).to(dtype)
    weights, ids = route(torch.randn(tokens, e, device="cuda", generator=g), k, normalize=True)
    out = fused_moe(x, w13, w2, ids, weights, backend="triton")
    ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights, dispatch="grouped")
    assert rel_err(out, ref) <= 1e-2


def test_fused_moe_fp32_exact_qwen3() -> None:
    w13, w2, k, g = _weights("qwen3_30b_a3b", torch.float32)
    x = torch.randn(64, 2048, device="cuda", generator=g)
    weights, ids = route(torch.randn(64, 128, device="cuda", generator=g), k, normalize=True)
    out = fused_moe(x, w13, w2, ids, weights, backend="triton")
    assert rel_err(out, moe_reference(x, w13, w2, ids, weights, dispatch="grouped")) <= 1e-5


@pytest.mark.parametrize("tokens", [1, 64])
def test_routed_moe_captures_in_a_cuda_graph(tokens: int) -> None:
    """Routing, alignment and both kernels replay under a CUDA graph with new inputs (no host syncs)."""
    w13, w2, k, g = _weights("qwen3_30b_a3b", torch.bfloat16)
    x = torch.randn(tokens, 2048, device="cuda", generator=g).to(torch.bfloat16)
    router = torch.randn(128, 2048, device="cuda", generator=g).to(torch.bfloat16)

    def step(inp: torch.Tensor) -> torch.Tensor:
        weights, ids = route(inp @ router.T, k, normalize=True)
        return fused_moe(inp, w13, w2, ids, weights, backend="triton")

    step(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x)
    x.copy_(torch.randn(tokens, 2048, device="cuda", generator=g).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    weights, ids = route(x @ router.T, k, normalize=True)
    ref = moe_reference(x.float(), w13.float(), w2.float(), ids, weights, dispatch="grouped")
    assert rel_err(out, ref) <= 1e-2
