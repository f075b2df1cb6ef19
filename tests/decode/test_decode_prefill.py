"""The bucketed prefill (``policyinject/decode/prefill.py``): right padding to a length bucket gives the
unpadded prefill's logits and Hugging Face's tokens (CPU, fp32); on a GPU the graphed prefill gives the eager
prefill's tokens exactly, captures once per bucket and never aliases its buffers."""

from __future__ import annotations

import pytest
import torch

from pi_testing import left_pad, prompts

from policyinject.decode.prefill import BucketedPrefill, bucket_for


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bucket_for_bounds():
    assert [bucket_for(n, 4096) for n in (1, 16, 17, 128, 129, 512, 513, 2048, 2049)] == \
        [16, 16, 32, 128, 256, 512, 768, 2048, 2304]
    assert bucket_for(100, 112) == 112
    with pytest.raises(ValueError, match="length=0"):
        bucket_for(0, 16)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lengths", [[5], [5, 9, 2], [16], [17]])
def test_padded_prefill_equals_the_unpadded_one(arch, lengths, injected, decoder_of):
    reference, engine = injected(arch)
    padded = decoder_of(engine)
    padded.prefill_buckets = True  # the GPU default, forced on the CPU
    plain = decoder_of(engine)
    plain.prefill_buckets = False
    ids, mask = left_pad(prompts(lengths, seed=7), pad=2)
    with torch.inference_mode():
        a = padded.prefill(ids, mask)
        b = plain.prefill(ids, mask)
    assert a.shape == b.shape and a.dtype == torch.float32
    assert _rel(a, b) < 1e-5
    # the cache slots of the prompt hold the same K/V
    t = ids.shape[1]
    assert torch.allclose(padded.cache.k[0][:, :, :t], plain.cache.k[0][:, :, :t], atol=1e-5)
    assert padded.stats["prefill_eager"] == 1 and padded.stats["prefill_captures"] == 0
    # generation through the padded prefill gives Hugging Face's tokens (pads after the prompt are never read)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(padded.generate(ids, attention_mask=mask, max_new_tokens=6), expected)


def test_returned_logits_do_not_alias_the_buffers(injected, decoder_of):
    _, engine = injected("llama")
    dec = decoder_of(engine)
    dec.prefill_buckets = True
    ids, mask = left_pad(prompts([4], seed=1), pad=2)
    with torch.inference_mode():
        first = dec.prefill(ids, mask)
        kept = first.clone()
        dec.prefill(*left_pad(prompts([3], seed=2), pad=2))
    assert torch.equal(first, kept)


def test_causal_only_needs_no_padding_and_no_window(injected, decoder_of):
    _, engine = injected("llama")
    p: BucketedPrefill = decoder_of(engine)._prefill
    assert p.causal_only(torch.ones(2, 3, dtype=torch.long))
    assert not p.causal_only(torch.tensor([[0, 1, 1]]))


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_graphed_prefill_gives_the_eager_tokens(arch, dtype, injected, decoder_of):
    _, engine = injected(arch, dtype=dtype, enable_cuda_graph=True)
    graphed = engine._get_decoder()
    eager = decoder_of(engine, use_graphs=False)
    assert graphed.prefill_buckets and eager.prefill_buckets
    for lengths, seed in (([5, 9, 2], 1), ([12], 2), ([12], 3), ([30, 17], 4), ([5, 9, 2], 5)):
        ids, mask = left_pad(prompts(lengths, seed=seed), pad=2)
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[])
        with torch.inference_mode():
            la, lb = graphed.prefill(ids, mask), eager.prefill(ids, mask)
        assert torch.equal(la, lb), (lengths, _rel(la, lb))
        assert torch.equal(graphed.generate(ids, **kw), eager.generate(ids, **kw)), lengths
    s = graphed.stats
    assert s["prefill_captures"] >= 2 and s["prefill_replays"] >= 3 and s["prefill_capture_failures"] == 0
    assert eager.stats["prefill_captures"] == 0


@pytest.mark.gpu
def test_graphed_prefill_matches_hugging_face_fp32(injected):
    reference, engine = injected("llama", dtype="fp32", enable_cuda_graph=True)
    reference = reference.cuda()
    for seed in (1, 2, 3):  # the first call runs eagerly (it allocates the cache), later ones replay
        ids = prompts([11], seed=seed)[0][None].cuda()
        expected = reference.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(engine.generate(ids, max_new_tokens=10), expected)
    assert engine._get_decoder().stats["prefill_replays"] >= 1


@pytest.mark.parametrize("name", ["policyinject.decode.prefill", "policyinject.bench.metrics"])
def test_doctests(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
