"""Failures found by the edge-case suite in the apply path, checkpoint loading and quantization module
selection: each test states the promised behaviour.

Promise (issue-level, docs/reliability.md): anything checkable is checked at plan time (checkpoint
completeness and shapes from the safetensors headers), raising a ``PolicyInjectError`` with the model
untouched; a failure during apply leaves no silently half-converted model; requested work that cannot be done
warns.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import policyinject as pi
from policyinject.testing.presets import tiny_model

IDS = torch.tensor([[1, 2, 3]])


def _state(model):
    return ({name: type(m).__name__ for name, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _same_tensor(a, b) -> bool:
    """Bit-equal, with NaN equal to NaN (``torch.equal`` says a NaN tensor differs from itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return torch.equal(a, b)


def _untouched(model, before) -> bool:
    types, tensors = _state(model)
    return (types == before[0] and tensors.keys() == before[1].keys()
            and all(_same_tensor(tensors[k], before[1][k]) for k in tensors))


def _checkpoint(tmp_path, edit):
    from safetensors.torch import save_file

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_a_checkpoint_missing_a_tensor_is_a_plan_error_and_the_model_is_untouched(tmp_path):
    path = _checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(pi.PlanError, match="model.layers.1.mlp.down_proj.weight"):
        pi.init_inference(model, dtype="fp32", checkpoint=str(path), replace_with_kernel_inject=True)
    assert _untouched(model, before)


def test_a_checkpoint_tensor_of_the_wrong_shape_is_a_plan_error(tmp_path):
    def shrink(t):
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)

    path = _checkpoint(tmp_path, shrink)
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(pi.PlanError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*64"):
        pi.init_inference(model, dtype="fp32", checkpoint=str(path), replace_with_kernel_inject=True)
    assert _untouched(model, before)


def test_a_quantization_failure_in_a_later_layer_leaves_no_silently_half_converted_model():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    before = _state(model)
    with pytest.raises(pi.PolicyInjectError, match="model.layers.1.mlp.down_proj"):
        pi.init_inference(model, dtype="int8")
    if not _untouched(model, before):  # the alternative the issue allows: every later forward refuses
        with pytest.raises(pi.PolicyInjectError):
            model(IDS)


def test_mixed_dtype_layers_are_refused_at_plan_time_or_converted():
    model = tiny_model("llama")
    lin = model.model.layers[1].mlp.down_proj
    lin.weight.data = lin.weight.data.half()
    before = _state(model)
    try:
        engine = pi.init_inference(model, dtype="auto", replace_with_kernel_inject=True)
    except pi.PolicyInjectError:
        assert _untouched(model, before)
    else:
        engine(IDS)  # it converted everything to one dtype: the forward must run


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Sequential(torch.nn.Linear(64, 64)),
    lambda: torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1)),
])
def test_int8_where_nothing_is_quantized_warns(make):
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = pi.init_inference(model, dtype="int8")
    quantized = engine.report.get("quantize", {}).get("linears", 0)
    assert quantized > 0 or any("int8" in str(w.message) or "quantiz" in str(w.message) for w in caught)


def test_tensor_parallel_without_a_process_group_is_refused_before_the_model_changes():
    model = tiny_model("llama")
    before = _state(model)
    with pytest.raises(pi.UnsupportedError, match="process group"):
        pi.init_inference(model, dtype="bf16", tensor_parallel={"tp_size": 2})
    assert _untouched(model, before)


def test_triton_backend_without_a_gpu_or_interpreter_is_refused_before_the_model_changes():
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU runs the Triton kernels")
    code = (
        "import torch, policyinject as pi\n"
        "from policyinject.testing.presets import tiny_model\n"
        "m = tiny_model('llama')\n"
        "try:\n"
        "    pi.init_inference(m, dtype='fp32', replace_with_kernel_inject=True, kernel_backend='triton')\n"
        "except (pi.UnsupportedError, pi.PlanError):\n"
        "    assert type(m.model.layers[0]).__name__ == 'LlamaDecoderLayer'\n"
        "    print('refused before any change')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "refused before any change" in out.stdout, out.stderr[-2000:]
