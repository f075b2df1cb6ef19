"""Kernel injection on a GPU: the Triton kernels natively, in bf16 and fp16 (skipped without CUDA).

Tolerances, relative error by norm of the logits (hidden states for BERT), injected vs the original model in
the same dtype: **bf16 <= 2e-2, fp16 <= 5e-3**. Both are also compared with the fp32 original: the injected
model's error must stay within twice the original model's own half-precision error (plus 1e-3), so the fused
kernels never lose more precision than Hugging Face's own half-precision path does.
"""

from __future__ import annotations

import copy

import pytest
import torch

from policyinject.testing.presets import TINY_ARCHS, available, preset_model, tiny_model

from pi_testing import _init_inference, output_tensor, rel_err

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _check(model_fp32: torch.nn.Module, dtype: torch.dtype, ids: torch.Tensor) -> None:
    ref32 = model_fp32.cuda()
    half = copy.deepcopy(ref32).to(dtype)
    injected = copy.deepcopy(ref32)
    engine = _init_inference()(injected, replace_with_kernel_inject=True, dtype=NAMES[dtype])
    assert engine.plan.for_pass("kernel_inject")
    assert any(getattr(m, "backend", None) == "auto" for m in injected.modules())
    ids = ids.cuda()
    with torch.no_grad():
        want32 = output_tensor(ref32(ids)).float()
        want = output_tensor(half(ids)).float()
        got = output_tensor(injected(ids)).float()
    err = rel_err(got, want)
    assert err <= TOLERANCE[dtype], f"{NAMES[dtype]}: injected vs original rel error {err:.2e}"
    own, ours = rel_err(want, want32), rel_err(got, want32)
    assert ours <= 2 * own + 1e-3, f"{NAMES[dtype]}: vs fp32, original {own:.2e}, injected {ours:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if available(a)])
def test_tiny_models_half_precision(arch, dtype):
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    _check(tiny_model(arch), dtype, ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_smollm2_shape_half_precision(dtype):
    model = preset_model("smollm2-135m", dtype=torch.float32, num_hidden_layers=4)
    ids = torch.randint(3, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    _check(model, dtype, ids)


def test_greedy_generate_fp32_on_gpu():
    model = tiny_model("llama").cuda()
    original = copy.deepcopy(model)
    _init_inference()(model, replace_with_kernel_inject=True, dtype="fp32")
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        want = original.generate(ids, max_new_tokens=8, do_sample=False)
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
