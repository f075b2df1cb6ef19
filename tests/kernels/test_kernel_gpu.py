"""The kernels compiled natively on a CUDA GPU at real shapes, against the references (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DTYPES, assert_close, poisoned_alloc, randn
from policyinject.kernels import activations as A
from policyinject.kernels import norms as N
from policyinject.kernels import reference as ref
from policyinject.kernels.rotary import rotary

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("shape", [(4096, 4096), (32, 4096), (1, 4096), (3, 77, 5120), (8, 16384)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norms_native(shape: tuple, dtype: torch.dtype) -> None:
    n = shape[-1]
    x, r = randn(*shape, dtype=dtype, device=DEV, scale=2.0), randn(*shape, dtype=dtype, device=DEV)
    w, b = randn(n, dtype=dtype, device=DEV), randn(n, dtype=dtype, device=DEV)
    with poisoned_alloc():
        y1 = N.rms_norm(x, w, 1e-6, backend="triton")
        y2, s2 = N.add_rms_norm(x, r, w, 1e-6, 1.0, backend="triton")
        y3 = N.layer_norm(x, w, b, 1e-5, backend="triton")
        y4, s4 = N.add_layer_norm(x, r, w, b, 1e-5, backend="triton")
    torch.cuda.synchronize()
    assert_close(y1, ref.rms_norm(x, w, 1e-6))
    ry2, rs2 = ref.add_rms_norm(x, r, w, 1e-6, 1.0)
    assert_close(y2, ry2)
    assert torch.equal(s2, rs2)  # the sum is exact on the GPU
    assert_close(y3, ref.layer_norm(x, w, b, 1e-5))
    ry4, rs4 = ref.add_layer_norm(x, r, w, b, 1e-5)
    assert_close(y4, ry4)
    assert torch.equal(s4, rs4)


def test_auto_uses_kernel_on_cuda_and_matches_hf() -> None:
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from policyinject.modules.norms import FusedRMSNorm

    hf = LlamaRMSNorm(4096, eps=1e-5).to(DEV, torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(randn(4096, device=DEV))
    fused = FusedRMSNorm.from_module(hf)
    x = randn(2, 64, 4096, dtype=torch.bfloat16, device=DEV)
    with torch.no_grad():
        assert_close(fused(x), hf(x))
        y, s = fused.forward_add(x, x)
        assert_close(y, hf(x + x))


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize(
    "case", [(1, 32, 8, 4096, 128, 128), (64, 32, 8, 1, 128, 128), (1, 32, 8, 1, 128, 128), (2, 32, 32, 256, 80, 32)],
    ids=["prefill", "decode-b64", "decode-b1", "partial"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_rotary_native(case: tuple, layout: str, dtype: torch.dtype) -> None:
    b, hq, hkv, t, d, rot = case
    q = randn(b, t, hq * d, dtype=dtype, device=DEV).view(b, t, hq, d).transpose(1, 2)
    k = randn(b, t, hkv * d, dtype=dtype, device=DEV).view(b, t, hkv, d).transpose(1, 2)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=DEV, dtype=torch.float32) / rot))
    pos = torch.arange(t, device=DEV, dtype=torch.float32) + 17
    freqs = pos[:, None] * inv
    emb = torch.cat((freqs, freqs), -1) if layout == "half" else freqs.repeat_interleave(2, -1)
    cos, sin = emb.cos()[None].expand(b, t, rot).to(dtype), emb.sin()[None].expand(b, t, rot).to(dtype)
    with poisoned_alloc():
        qo, ko = rotary(q, k, cos, sin, layout, backend="triton")
    torch.cuda.synchronize()
    rq, rk = ref.rotary(q, k, cos, sin, layout)
    assert_close(qo, rq)
    assert_close(ko, rk)
    q2, k2 = q.clone(), k.clone()
    rotary(q2, k2, cos, sin, layout, inplace=True, backend="triton")
    assert_close(q2, rq)
    assert_close(k2, rk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 14336), (1, 14336), (3, 5, 1000)], ids=str)
def test_activations_native(shape: tuple, dtype: torch.dtype) -> None:
    gate, up = randn(*shape, dtype=dtype, device=DEV, scale=3.0), randn(*shape, dtype=dtype, device=DEV)
    with poisoned_alloc():
        a = A.swiglu(gate, up, backend="triton")
        b_ = A.geglu(gate, up, "tanh", backend="triton")
        c = A.geglu(gate, up, "none", backend="triton")
        d = A.gated_act(torch.cat([gate, up], -1), "silu", backend="triton")
    torch.cuda.synchronize()
    assert_close(a, ref.swiglu(gate, up))
    assert_close(b_, ref.geglu(gate, up, "tanh"))
    assert_close(c, ref.geglu(gate, up, "none"))
    assert_close(d, ref.swiglu(gate, up))
