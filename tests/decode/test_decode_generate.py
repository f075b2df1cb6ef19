"""The decode engine's eager path (the same steps the CUDA graphs capture) against Hugging Face generate."""

from __future__ import annotations

import pytest
import torch

from policyinject.errors import UnsupportedError
from policyinject.testing.presets import available

from pi_testing import left_pad, prompts

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3", "gpt2", "gpt_neox", "opt", "falcon"]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(arch, injected, decoder_of):
    if not available(arch):
        pytest.skip(f"{arch} not in this transformers")
    reference, engine = injected(arch)
    ids = prompts([7], seed=1)[0][None]
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    got = decoder_of(engine).generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected), (got, expected)


def test_engine_generate_uses_the_decoder_when_installed(injected):
    reference, engine = injected("llama")
    ids = prompts([5], seed=2)[0][None]
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert engine.plan.decode is not None and engine.plan.decode.supported and not engine.plan.decode.use_graphs
    assert engine._get_decoder() is not None
    assert torch.equal(engine.generate(ids, max_new_tokens=6), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_left_padded_batch_matches_each_prompt_alone(arch, injected, decoder_of):
    _, engine = injected(arch)
    dec = decoder_of(engine)
    seqs = prompts([3, 9, 6, 1], seed=3)
    ids, mask = left_pad(seqs, pad=2)
    batched = dec.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for i, s in enumerate(seqs):
        alone = dec.generate(s[None], max_new_tokens=8, eos_token_id=[])
        assert torch.equal(batched[i, ids.shape[1]:], alone[0, len(s):]), i


def test_left_padded_batch_matches_hf(injected, decoder_of):
    reference, engine = injected("llama")
    seqs = prompts([4, 8], seed=4)
    ids, mask = left_pad(seqs, pad=2)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(decoder_of(engine).generate(ids, attention_mask=mask, max_new_tokens=8), expected)


def test_eos_stops_like_hf(injected, decoder_of):
    reference, engine = injected("llama")
    dec = decoder_of(engine)
    ids, mask = left_pad(prompts([6, 4], seed=5), pad=2)
    free = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 2])  # row 0 produces this token at its third step
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  eos_token_id=eos, pad_token_id=0)
    got = dec.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    # a single prompt stops as soon as it produced EOS
    one = dec.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=eos)
    first = (free[0, ids.shape[1]:] == eos).int().argmax().item()
    assert one.shape[1] == ids.shape[1] + first + 1 and int(one[0, -1]) == eos


def test_eos_check_interval_trims_to_hf_length(injected, decoder_of):
    reference, engine = injected("gpt2")
    dec = decoder_of(engine)
    dec.eos_check_interval = 4
    ids = prompts([5], seed=6)[0][None]
    free = dec.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 5 + 5])
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(dec.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0), expected)


def test_min_new_tokens_suppresses_eos_like_hf(injected, decoder_of):
    reference, engine = injected("llama")
    dec = decoder_of(engine)
    ids = prompts([5], seed=7)[0][None]
    free = dec.generate(ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 5 + 1])
    expected = reference.generate(ids, max_new_tokens=8, min_new_tokens=4, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)
    got = dec.generate(ids, max_new_tokens=8, min_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(injected, decoder_of):
    _, engine = injected("llama")
    dec = decoder_of(engine)
    ids, mask = left_pad(prompts([5, 3], seed=8), pad=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    a = dec.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, seed=123, **kw)
    b = dec.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, seed=123, **kw)
    c = dec.generate(ids, do_sample=True, temperature=0.9, top_p=0.95, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    top1 = dec.generate(ids, do_sample=True, top_k=1, generator=g, **kw)
    assert torch.equal(top1, dec.generate(ids, do_sample=False, **kw))


def test_hf_defaults_and_generation_config(injected, decoder_of):
    reference, engine = injected("llama")
    ids = prompts([4], seed=9)[0][None]
    # no length given: Hugging Face generates 20 new tokens
    expected = reference.generate(ids, do_sample=False)
    got = decoder_of(engine).generate(ids)
    assert torch.equal(got, expected) and got.shape[1] == 4 + 20


def test_returned_tokens_are_not_aliased(injected, decoder_of):
    _, engine = injected("llama")
    dec = decoder_of(engine)
    ids = prompts([4], seed=10)[0][None]
    first = dec.generate(ids, max_new_tokens=6, eos_token_id=[])
    kept = first.clone()
    dec.generate(prompts([4], seed=11)[0][None], max_new_tokens=6, eos_token_id=[])
    assert torch.equal(first, kept)


def test_bigger_batch_reallocates_the_cache(injected, decoder_of):
    _, engine = injected("llama")
    dec = decoder_of(engine)
    one = prompts([4], seed=12)[0][None]
    dec.generate(one, max_new_tokens=3)
    assert dec.cache.batch_capacity == 1
    ids, mask = left_pad(prompts([4, 6, 2], seed=12), pad=2)
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    assert dec.cache.batch_capacity == 3 and out.shape == (3, 9)
    # a smaller batch reuses the big cache
    assert torch.equal(dec.generate(one, max_new_tokens=3, eos_token_id=[])[0, :4], one[0])


def test_clear_errors(injected, decoder_of):
    _, engine = injected("llama", max_out_tokens=16, max_batch_size=2)
    dec = decoder_of(engine)
    ids = prompts([8], seed=13)[0][None]
    with pytest.raises(ValueError, match="max_out_tokens=16"):
        dec.generate(ids, max_new_tokens=9)
    with pytest.raises(ValueError, match="max_batch_size"):
        dec.generate(ids.repeat(3, 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="right padding"):
        dec.generate(ids, attention_mask=torch.tensor([[1] * 7 + [0]]), max_new_tokens=2)
    with pytest.raises(UnsupportedError, match="num_beams=4"):
        dec.generate(ids, max_new_tokens=2, num_beams=4)
    dec.generate(ids, max_new_tokens=2, num_beams=1, use_cache=True)  # neutral HF keys are accepted


def test_model_without_injected_blocks_is_refused(decoder_of):
    from policyinject.decode.generate import Decoder
    from policyinject.testing.presets import tiny_model
    from policyinject_plugins.llama import LLAMA_CAUSAL_LM

    with pytest.raises(UnsupportedError, match="LlamaDecoderLayer is not an injected block"):
        Decoder(tiny_model("llama"), LLAMA_CAUSAL_LM)
    with pytest.raises(UnsupportedError, match="no model-level policy"):
        Decoder(tiny_model("llama"), None)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi", "gpt_neox", "gpt2"])
def test_triton_decode_attention_gives_the_same_tokens(arch, injected, decoder_of):
    """The Triton decode attention (rotary fused in: half, partial; q/k norms before it) under the
    interpreter gives the PyTorch path's tokens."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    _, engine = injected(arch, kernel_backend="torch")
    ids, mask = left_pad(prompts([5, 3], seed=14), pad=2)
    reference = decoder_of(engine).generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    dec = decoder_of(engine)
    dec.backend = "triton"
    assert torch.equal(dec.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]), reference)
