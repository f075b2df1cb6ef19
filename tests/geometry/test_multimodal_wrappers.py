"""Known decoder layers inside vision-language wrappers read their geometry from the text sub-config.

Tiny random wrappers of the installed ``transformers`` (fp32): the text path gives the unconverted model's
logits with kernel injection, under 2-rank tensor parallelism, and int8 quantizes the language model's layers;
``generate`` falls back to Hugging Face's (no model-level policy covers the wrapper) with its one-line notice
and gives the same tokens.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from pi_testing import rel_err

import policyinject as pi
from policyinject.policy.geometry import config_for_layer, layer_geometry

from geom_workers import run_ranks
from mm_models import BUILDERS, build

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_text_path_injects_exactly_and_generates(name):
    model = build(name)
    ref = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True)
    layers = model.model.language_model.layers
    assert {type(l).__name__ for l in layers} == {"InjectedBlock"}
    for path, info in engine.plan.injection.blocks.items():
        assert path.startswith("model.language_model.layers.")
        assert (info.heads, info.kv_heads, info.head_dim) == (4, 2, 8)
    with torch.inference_mode():
        assert rel_err(engine(input_ids=IDS).logits, ref(input_ids=IDS).logits) <= 1e-5
    assert not engine.plan.decode.supported  # no model-level policy for the wrapper: Hugging Face generate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False)
    notices = [str(w.message) for w in caught if "uses Hugging Face generate" in str(w.message)]
    assert len(notices) == 1 and type(model).__name__ in notices[0]
    want = ref.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, want)


def test_geometry_comes_from_the_layer_sub_config_not_the_wrapper():
    model = build("llava")
    layer = model.model.language_model.layers[0]
    from policyinject_plugins.llama import LLAMA_LAYER

    assert getattr(model.config, "num_attention_heads", None) is None  # the wrapper's config has no heads
    assert config_for_layer(layer, LLAMA_LAYER.attention, model.config) is model.config.text_config
    counts = layer_geometry(layer, LLAMA_LAYER.attention, model.config)
    assert (counts.heads, counts.kv_heads, counts.head_dim) == (4, 2, 8)


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_int8_quantizes_the_language_model_layers(name):
    model = build(name)
    ref = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="int8", kernel_backend="torch")
    quantized = [a.path for a in engine.plan.for_pass("quantize") if a.action == "quantize"]
    assert quantized and all(p.startswith("model.language_model.layers.") for p in quantized)
    assert len(quantized) == 2 * 7
    with torch.inference_mode():
        assert rel_err(engine(input_ids=IDS).logits, ref(input_ids=IDS).logits) < 0.02


def test_two_rank_tensor_parallel_text_path():
    results = run_ranks(2, [("wrapper_tp", dict(name="llava", tp=2)), ("wrapper_tp", dict(name="mistral3", tp=2))])
    for rank, per_task in enumerate(results):
        for res in per_task:
            assert "error" not in res, res.get("error")
            assert res["rel"] <= 1e-5, (rank, res)
            assert res["heads"]["model.language_model.layers.0"] == {"heads": 2, "kv_heads": 1}
