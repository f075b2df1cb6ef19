"""``engine.generate`` arguments that ask for nothing: Hugging Face's ``generate`` accepts a known keyword
given as None (unset, the default) or ``synced_gpus=False``; the decode loop must not refuse them as
unsupported features. Anything that does ask for a feature the loop lacks still raises ``UnsupportedError``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import policyinject as pi
from policyinject.testing.presets import tiny_model

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.fixture(scope="module")
def pair():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True)
    assert engine._get_decoder() is not None
    return reference, engine


@pytest.mark.parametrize("kwargs", [
    {"assistant_model": None}, {"compile_config": None}, {"synced_gpus": False}, {"synced_gpus": None},
    {"num_beam_groups": None}, {"typical_p": None}, {"watermarking_config": None}, {"prefix_allowed_tokens_fn": None},
    {"negative_prompt_ids": None}, {"stop_strings": None}, {"max_time": None},
])
def test_keywords_that_ask_for_nothing_give_hf_tokens(pair, kwargs):
    reference, engine = pair
    expected = reference.generate(IDS, max_new_tokens=4, do_sample=False, **kwargs)
    assert torch.equal(engine.generate(IDS, max_new_tokens=4, **kwargs), expected)


@pytest.mark.parametrize("kwargs", [{"synced_gpus": True}, {"max_time": 1.0}, {"stop_strings": ["x"]}])
def test_keywords_that_ask_for_a_missing_feature_still_raise(pair, kwargs):
    _, engine = pair
    with pytest.raises(pi.UnsupportedError, match=next(iter(kwargs))):
        engine.generate(IDS, max_new_tokens=4, **kwargs)
