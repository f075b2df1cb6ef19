"""``engine.generate`` against Hugging Face ``generate`` on random prompts: batch size, prompt length, left
padding, ``max_new_tokens`` from 1, an EOS that may or may not be hit, ``min_new_tokens``, the repetition
penalty, and the same engine reused across shapes (the KV cache and state buffers are re-used or grown)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policyinject as pi
from policyinject.testing.presets import tiny_model

PAD = 2


@pytest.fixture(scope="module")
def pair():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, max_out_tokens=24)
    for m in (reference, engine.module):  # no default EOS: Hugging Face's eos_token_id=None means "the config's"
        m.generation_config.eos_token_id = None
    return reference, engine


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_greedy_tokens_equal_hugging_face(pair, data):
    reference, engine = pair
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.integers(1, 8), label="length")
    pads = [data.draw(st.integers(0, length - 1), label=f"pads{i}") for i in range(batch)]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    new = data.draw(st.integers(1, 10), label="max_new_tokens")
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = PAD
    kwargs = {"max_new_tokens": new}
    first = reference.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                               max_new_tokens=new)[:, length:]
    if data.draw(st.booleans(), label="eos from the output"):  # an EOS the greedy run really meets
        kwargs["eos_token_id"] = int(first[0, data.draw(st.integers(0, new - 1), label="eos step")])
        kwargs["min_new_tokens"] = data.draw(st.integers(0, new), label="min_new_tokens")
    else:
        kwargs["eos_token_id"] = []
    if data.draw(st.booleans(), label="penalty"):
        kwargs["repetition_penalty"] = 1.3
    hf_kwargs = dict(kwargs, eos_token_id=kwargs["eos_token_id"] or None)
    expected = reference.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **hf_kwargs)
    got = engine.generate(ids, attention_mask=mask, pad_token_id=PAD, **kwargs)
    assert torch.equal(got, expected), (got[:, length:].tolist(), expected[:, length:].tolist(), kwargs)
