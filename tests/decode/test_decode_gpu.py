"""CUDA graphs of the decode engine (GPU only): same tokens as the eager steps, re-capture per signature,
bounded LRU, no aliasing of returned tensors, sampling through graphs."""

from __future__ import annotations

import pytest
import torch

from pi_testing import left_pad, prompts

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_engine(injected):
    def build(arch: str = "llama", dtype: str = "bf16", **config):
        from policyinject.testing.presets import tiny_model  # noqa: F401  (injected builds it)

        reference, engine = injected(arch, dtype=dtype, enable_cuda_graph=True, **config)
        assert engine.device.type == "cuda"
        return reference, engine

    return build


def _ids(lengths, seed, pad=2):
    ids, mask = left_pad(prompts(lengths, seed=seed), pad=pad)
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "phi"])
def test_graphs_give_the_eager_tokens(arch, dtype, gpu_engine, decoder_of):
    _, engine = gpu_engine(arch, dtype)
    graphed = engine._get_decoder()
    assert graphed is not None and graphed.use_graphs
    eager = decoder_of(engine, use_graphs=False)
    ids, mask = _ids([5, 9, 2], seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    a = engine.generate(ids, **kw)
    b = eager.generate(ids, **kw)
    assert torch.equal(a, b)
    assert graphed.stats["captures"] >= 1 and graphed.stats["replays"] >= 20


def test_fp32_graphs_match_hugging_face(gpu_engine):
    reference, engine = gpu_engine("llama", "fp32")
    reference = reference.cuda()
    ids = prompts([6], seed=2)[0][None].cuda()
    expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(engine.generate(ids, max_new_tokens=16), expected)


def test_new_batch_size_captures_a_new_graph_and_old_ones_replay(gpu_engine):
    _, engine = gpu_engine(max_batch_size=4)  # a bigger batch than the cache holds re-allocates it
    dec = engine._get_decoder()
    one = prompts([4], seed=3)[0][None].cuda()
    first = engine.generate(one, max_new_tokens=8, eos_token_id=[])
    captures = dec.stats["captures"]
    ids, mask = _ids([4, 7], seed=4)
    engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert dec.stats["captures"] == captures + 1
    again = engine.generate(one, max_new_tokens=8, eos_token_id=[])
    assert dec.stats["captures"] == captures + 1  # batch 1 replays its graph
    assert torch.equal(first, again)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_span_change_mid_generation(backend, gpu_engine, decoder_of):
    _, engine = gpu_engine(max_out_tokens=600)
    dec = engine._get_decoder()
    eager = decoder_of(engine, use_graphs=False)
    for d in (dec, eager):
        d.min_span, d.backend = 16, backend
    ids = prompts([10], seed=5)[0][None].cuda()
    kw = dict(max_new_tokens=40, eos_token_id=[])  # spans 16, 32, 64 on the PyTorch path
    assert torch.equal(engine.generate(ids, **kw), eager.generate(ids, **kw))
    # the Triton kernel reads its bound on the device: one graph whatever the position
    assert dec.stats["captures"] == (3 if backend == "torch" else 1)


def test_lru_bound_and_eviction(gpu_engine):
    _, engine = gpu_engine(cuda_graph_cache_size=2, max_batch_size=4)
    dec = engine._get_decoder()
    outs = {}
    for b in (1, 2, 3, 1):
        ids, mask = _ids([5] * b, seed=6)
        outs.setdefault(b, []).append(engine.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]))
        assert len(dec.graphs) <= 2
    assert dec.stats["evictions"] >= 1
    assert torch.equal(outs[1][0], outs[1][1])  # re-captured after eviction, same tokens


def test_returned_tensors_are_not_aliased(gpu_engine):
    _, engine = gpu_engine()
    ids = prompts([4], seed=7)[0][None].cuda()
    a = engine.generate(ids, max_new_tokens=8, eos_token_id=[])
    kept = a.clone()
    engine.generate(prompts([4], seed=8)[0][None].cuda(), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(a, kept)
    dec = engine._get_decoder()
    st = next(iter(dec._states.values()))
    assert a.untyped_storage().data_ptr() != st.out.untyped_storage().data_ptr()


def test_sampling_through_graphs_is_reproducible_and_matches_eager(gpu_engine, decoder_of):
    _, engine = gpu_engine()
    eager = decoder_of(engine, use_graphs=False)
    ids, mask = _ids([5, 3], seed=9)
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=0.8, top_k=20,
              top_p=0.9)
    a = engine.generate(ids, seed=1, **kw)
    b = engine.generate(ids, seed=1, **kw)
    c = eager.generate(ids, seed=1, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_eos_stops_under_graphs_like_eager(gpu_engine, decoder_of):
    _, engine = gpu_engine()
    eager = decoder_of(engine, use_graphs=False)
    ids, mask = _ids([5, 8], seed=10)
    free = eager.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 3])
    kw = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=0, min_new_tokens=2)
    assert torch.equal(engine.generate(ids, **kw), eager.generate(ids, **kw))
