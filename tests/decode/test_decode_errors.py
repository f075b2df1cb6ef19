"""Clear errors: CUDA graphs without CUDA, with tensor parallelism, without kernel injection, opaque layers."""

from __future__ import annotations

import pytest
import torch

from policyinject.errors import PlanError, UnsupportedError
from policyinject.testing.presets import tiny_model

from pi_testing import _init_inference

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")


@needs_no_cuda
def test_cuda_graphs_without_cuda_is_a_clear_unsupported_error():
    model = tiny_model("llama")
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(UnsupportedError, match=r"enable_cuda_graph.*CUDA build of torch.*" + torch.__version__.split("+")[0]):
        _init_inference()(model, enable_cuda_graph=True, replace_with_kernel_inject=True, dtype="fp32")
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert before == [p.data_ptr() for p in model.parameters()]


@needs_no_cuda
def test_decoder_with_graphs_without_cuda_raises():
    from policyinject.decode.generate import Decoder

    reference = tiny_model("llama")
    engine = _init_inference()(reference, replace_with_kernel_inject=True, dtype="fp32")
    with pytest.raises(UnsupportedError, match="CUDA"):
        Decoder.from_engine(engine, use_graphs=True)


def test_cuda_graphs_with_tensor_parallel_refused_at_plan_time_where_not_capturable():
    from policyinject.config import load_config
    from policyinject.errors import PlanError
    from policyinject.pipeline import plan_inference

    cfg = load_config(enable_cuda_graph=True, tensor_parallel={"tp_size": 2})  # validation accepts it
    model = tiny_model("llama")
    before = [type(m).__name__ for m in model.modules()]
    # planning only (no process group): the group init_inference would create on the CPU is gloo
    with pytest.raises(PlanError, match=r"needs NCCL on CUDA.*backend 'gloo' on cpu"):
        plan_inference(model, cfg, replace_with_kernel_inject=True, dtype="fp32", keep_module_on_host=True)
    assert [type(m).__name__ for m in model.modules()] == before


def _ctx(arch: str, **config):
    from policyinject.config import load_config
    from policyinject.pipeline import prepare

    cfg = load_config(dtype="fp32", **config)
    # plan without the cuda_graph pass (it refuses on a CPU machine before anything else)
    return prepare(tiny_model(arch), cfg).context


def test_plan_problems_without_kernel_injection():
    from policyinject.passes.cuda_graph import plan_problems

    ctx = _ctx("llama", replace_with_kernel_inject=False)
    assert plan_problems(ctx) == ["`enable_cuda_graph` needs `replace_with_kernel_inject` = True: the decode graphs "
                                  "run the injected blocks"]


def test_plan_problems_name_opaque_layers():
    import attrs
    from policyinject.passes.cuda_graph import plan_problems

    ctx = _ctx("llama", replace_with_kernel_inject=True)
    assert plan_problems(ctx) == []
    ctx.layers = [attrs.evolve(m, policy=attrs.evolve(m.policy, block="opaque")) for m in ctx.layers]
    problems = plan_problems(ctx)
    assert problems and all("LlamaDecoderLayer" in p and "opaque" in p for p in problems)


def test_plan_problems_name_moe_layers_with_moe_disabled():
    from policyinject.passes.cuda_graph import plan_problems

    assert plan_problems(_ctx("mixtral", replace_with_kernel_inject=True)) == []  # the MoE block is injected
    problems = plan_problems(_ctx("mixtral", replace_with_kernel_inject=True, moe={"enabled": False}))
    assert problems and all("MixtralDecoderLayer" in p and "`moe.enabled` is false" in p for p in problems)


def test_plan_problems_name_the_model_policy_gap():
    import attrs
    from policyinject.passes.cuda_graph import plan_problems

    ctx = _ctx("llama", replace_with_kernel_inject=True)
    ctx.model_policy = attrs.evolve(ctx.model_policy, lm_head=None)
    assert plan_problems(ctx) == ["ModelPolicy for LlamaForCausalLM has no `lm_head`; the decode engine needs it"]
    ctx.model_policy = None
    assert "no model-level policy covers LlamaForCausalLM" in plan_problems(ctx)[0]


def test_cuda_graph_pass_plan_raises_plan_error_on_gpu_machines_too(monkeypatch):
    from policyinject.passes import cuda_graph

    monkeypatch.setattr(cuda_graph, "require_cuda", lambda what="": None)
    ctx = _ctx("mixtral", replace_with_kernel_inject=True, moe={"enabled": False})
    ctx.device = torch.device("cuda", 0)
    with pytest.raises(PlanError, match="moe.enabled"):
        cuda_graph.CudaGraphPass().plan(ctx)


def test_eager_decoder_falls_back_for_unsupported_models_and_serves_supported_ones():
    import attrs

    from policyinject.decode.generate import Decoder, build_decoder

    init = _init_inference()
    unsupported = init(tiny_model("mixtral"), replace_with_kernel_inject=True, dtype="fp32", moe={"enabled": False})
    decode = unsupported.plan.decode
    assert decode is not None and not decode.supported and decode.when_unsupported == "fallback"
    assert any("MixtralDecoderLayer" in p for p in decode.problems)
    assert build_decoder(unsupported.module, unsupported.plan) is None
    strict = attrs.evolve(unsupported.plan, decode=attrs.evolve(decode, when_unsupported="raise"))
    with pytest.raises(UnsupportedError, match="MixtralDecoderLayer"):
        build_decoder(unsupported.module, strict)

    reference = tiny_model("llama")
    expected = reference.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    engine = init(reference, replace_with_kernel_inject=True, dtype="fp32")
    assert engine.plan.decode.supported
    assert isinstance(engine._get_decoder(), Decoder)
    assert torch.equal(engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4), expected)
