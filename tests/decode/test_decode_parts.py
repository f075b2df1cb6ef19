"""Static KV cache, masks, spans, device-side state and sampling warpers (against Hugging Face's)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from policyinject.decode.kv_cache import StaticKVCache, decode_mask, prefill_mask, span_for
from policyinject.decode.sampling import Sampler, sample, warp
from policyinject.decode.state import DecodeState


def _reference_attention(q, k, v, allowed):
    """Plain attention with repeated K/V and a boolean mask [B, Tq, Tk]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1) @ v


def test_span_for_is_a_power_of_two_capped_at_max_len():
    assert [span_for(n, 1024, 256) for n in (1, 255, 256, 257, 513, 1024)] == [256, 256, 256, 512, 1024, 1024]
    assert span_for(5, 3, 1) == 3


def test_prefill_then_decode_steps_match_full_attention():
    torch.manual_seed(0)
    b, hq, hkv, d, t, max_len = 2, 4, 2, 8, 5, 32
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = StaticKVCache(1, max_len)
    cache.reserve(b)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    out = cache.prefill_attend(0, prefill_mask(mask, torch.float32))(q, k, v)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = causal[None] & mask.bool()[:, None]
    ref = _reference_attention(q, k, v, allowed)
    real = mask.bool()  # pad query rows are garbage by design; compare real rows only
    assert torch.allclose(out.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5)
    assert torch.isfinite(out).all()
    # decode steps: each new token attends over every real slot so far
    kv_mask = torch.zeros(b, max_len, dtype=torch.bool)
    kv_mask[:, :t] = mask.bool()
    keys, values, valid = [k], [v], [mask.bool()]
    for step in range(3):
        pos = torch.tensor([t + step])
        kv_mask[:, t + step] = True
        qn, kn, vn = torch.randn(b, hq, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
        span = span_for(t + step + 1, max_len, 8)
        out = cache.decode_attend(0, b, span, pos, kv_mask, backend="torch")(qn, kn, vn)
        keys.append(kn), values.append(vn), valid.append(torch.ones(b, 1, dtype=torch.bool))
        ref = _reference_attention(qn, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(valid, 1)[:, None])
        assert torch.allclose(out, ref, atol=1e-5), step
    assert torch.equal(cache.k[0][:, :, t + 2], kn[:, :, 0])


@pytest.mark.parametrize("shape", [
    (2, 4, 2, 16, 40, 17, None, torch.float32),   # GQA
    (1, 8, 8, 32, 80, 70, None, torch.float32),   # MHA, several blocks
    (3, 6, 2, 24, 32, 20, 5, torch.float32),      # head_dim not a power of two, sliding window
    (2, 4, 1, 16, 64, 33, None, torch.float16),   # MQA, 16-bit (bf16 dots are wrong in the interpreter)
])
def test_decode_attention_kernel_matches_reference(shape):
    from policyinject.decode.attention import decode_attention

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    b, hq, hkv, d, max_len, pos, window, dtype = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(sum(shape[:6]))
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    kc, vc = rnd(b + 1, hkv, max_len, d), rnd(b + 1, hkv, max_len, d)
    kv = (torch.rand(b, max_len, generator=g) > 0.3).to(device)
    kv[:, pos] = True
    kv[:, pos + 1:] = False
    q, k, v = rnd(b, hq, 1, d), rnd(b, hkv, 1, d), rnd(b, hkv, 1, d)
    cp = torch.tensor([pos], device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = decode_attention(q, k, v, kc, vc, cp, kv, span=max_len, window=window, backend="torch")
    out = decode_attention(q, k, v, kc2, vc2, cp, kv, span=max_len, window=window, backend="triton", block_s=16)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("layout,r", [("half", 16), ("half", 8), ("interleaved", 16), ("interleaved", 6)])
def test_decode_attention_kernel_fuses_rotary(layout, r):
    from policyinject.decode.attention import decode_attention
    from policyinject.kernels.reference import rotary

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, hq, hkv, d, max_len, pos = 2, 4, 2, 16, 24, 9
    g = torch.Generator().manual_seed(r)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    kc, vc = rnd(b, hkv, max_len, d), rnd(b, hkv, max_len, d)
    kv = torch.zeros(b, max_len, dtype=torch.bool, device=device)
    kv[:, :pos + 1] = True
    q, k, v = rnd(b, hq, 1, d), rnd(b, hkv, 1, d), rnd(b, hkv, 1, d)
    angle = rnd(b, 1, r)
    cos, sin = angle.cos(), angle.sin()
    cp = torch.tensor([pos], device=device)
    kc2, vc2, kc3, vc3 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    qr, kr = rotary(q, k, cos, sin, layout=layout)
    ref = decode_attention(qr, kr, v, kc, vc, cp, kv, span=max_len, backend="torch")
    torch_fused = decode_attention(q, k, v, kc2, vc2, cp, kv, span=max_len, backend="torch", cos=cos, sin=sin,
                                   rotary=layout)
    kernel = decode_attention(q, k, v, kc3, vc3, cp, kv, span=max_len, backend="triton", cos=cos, sin=sin,
                              rotary=layout, block_s=16)
    assert torch.equal(torch_fused, ref)
    assert ((kernel - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.allclose(kc3, kc, atol=1e-6) and torch.equal(vc3, vc)


def test_sliding_window_masks():
    m = prefill_mask(torch.ones(1, 5, dtype=torch.long), torch.float32, window=2)[0, 0] == 0
    assert m.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    kv = torch.ones(1, 8, dtype=torch.bool)
    d = decode_mask(kv, torch.tensor([5]), 8, torch.float32, window=3)[0, 0, 0] == 0
    assert d.int().tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # slots 6, 7 are masked by kv_mask in real use


def test_cache_grows_for_a_bigger_batch_and_bumps_generation():
    cache = StaticKVCache(1, 8)
    cache.reserve(1)
    g = cache.generation
    cache.prefill_attend(0, prefill_mask(torch.ones(1, 2), torch.float32))(*[torch.randn(1, 2, 2, 4)] * 3)
    assert cache.generation > g and cache.k[0].shape[0] == 1
    g = cache.generation
    cache.reserve(1)
    assert cache.generation == g
    cache.reserve(3)
    assert cache.generation > g and cache.k[0] is None and cache.batch_capacity == 3


def test_state_snapshot_restores_every_buffer():
    st = DecodeState(2, 8, 10, "cpu")
    st.start(torch.ones(2, 3), eos_ids=[4], pad=0, min_new=0)
    restore = st.snapshot()
    before = {n: getattr(st, n).clone() for n in ("tokens", "pos", "cache_pos", "step", "kv_mask", "finished", "out")}
    st.advance(torch.tensor([4, 5]))
    st.consumed()
    st.kv_mask.fill_(True)
    restore()
    for name, value in before.items():
        assert torch.equal(getattr(st, name), value), name


def test_finished_rows_emit_pad():
    st = DecodeState(2, 8, 10, "cpu")
    st.start(torch.ones(2, 3), eos_ids=[4, 7], pad=9, min_new=0)
    st.advance(torch.tensor([7, 5]))
    st.advance(torch.tensor([3, 4]))
    st.advance(torch.tensor([3, 3]))
    assert st.out[:, :3].tolist() == [[7, 9, 9], [5, 4, 9]]
    assert st.finished.tolist() == [True, True]


@pytest.mark.parametrize("seed", range(5))
def test_warpers_match_hugging_face(seed):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=g) * 3
    ids = torch.zeros(3, 1, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.0, None, 0.8), (1.3, 10, 0.9),
                                      (1.0, 1, None), (1.0, None, 0.0)]:
        ref = logits.clone()
        if temperature != 1.0:
            ref = TemperatureLogitsWarper(temperature)(ids, ref)
        if top_k:
            ref = TopKLogitsWarper(top_k)(ids, ref)
        if top_p is not None:
            ref = TopPLogitsWarper(top_p)(ids, ref)
        got = warp(logits, temperature, top_k, top_p)
        assert torch.equal(got.isinf(), ref.isinf()), (temperature, top_k, top_p)
        assert torch.allclose(got[~got.isinf()], ref[~ref.isinf()])


def test_exponential_race_samples_the_softmax_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, g), minlength=4).float() / 20000
    assert torch.allclose(counts, probs, atol=0.015), counts
    assert int(sample(warp(logits[:1], top_k=1), g)) == 0


def test_sampler_validates_parameters():
    with pytest.raises(ValueError, match="temperature"):
        Sampler(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        Sampler(do_sample=True, top_p=1.5)
    assert Sampler(do_sample=False, temperature=0.0).greedy  # greedy ignores warpers, as Hugging Face


@pytest.mark.parametrize("vocab", [128256, 50257, 256, 3])
def test_nonfinite_flag_matches_its_definition(vocab):
    """The flag (from greedy's maxima or from flag_nonfinite) is set exactly when some entry is NaN or +inf
    or some row is -inf everywhere, on fresh random rows with hostile values planted."""
    from policyinject.decode.sampling import flag_nonfinite, greedy

    g = torch.Generator().manual_seed(vocab)
    for trial in range(24):
        x = torch.randn(3, vocab, generator=g)
        kind = trial % 6
        row = int(torch.randint(0, 3, (1,), generator=g))
        col = int(torch.randint(0, vocab, (1,), generator=g))
        if kind == 1:
            x[row, col] = float("nan")
        elif kind == 2:
            x[row, col] = float("inf")
        elif kind == 3:
            x[row] = float("-inf")
        elif kind == 4:
            x[row, col] = float("-inf")  # one -inf entry is a filtered token, not garbage
        elif kind == 5:
            x[row, : max(vocab - 1, 1)] = float("-inf")  # all but the last
        want = bool(torch.isnan(x).any() or torch.isposinf(x).any() or torch.isneginf(x).all(dim=-1).any())
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
            flag_nonfinite(a, x.to(dtype))
            greedy(x.to(dtype), b)
            assert bool(a) == want and bool(b) == want, (vocab, kind, dtype)


def test_chunked_greedy_equals_argmax_with_ties_across_chunks():
    from policyinject.decode.sampling import greedy

    g = torch.Generator().manual_seed(11)
    for vocab in (128256, 49152, 151936, 50257, 32000, 256):
        for _ in range(20):
            x = torch.randn(3, vocab, generator=g).to(torch.bfloat16)
            hot = torch.randint(0, vocab, (3,), generator=g)
            x[0, hot] = 10.0  # ties, possibly in different chunks: the first index must win
            x[1, -1] = 10.0
            assert torch.equal(greedy(x), torch.argmax(x, dim=-1)), vocab
