"""Loud or right: concurrent calls, Hugging Face's parameter validation, non-finite logits, malformed prompts,
the streamer protocol."""

from __future__ import annotations

import threading

import pytest
import torch

from policyinject.errors import NonFiniteLogitsError, UnsupportedError

from pi_testing import left_pad, prompts


@pytest.fixture
def engine(injected):
    return injected("llama")[1]


# ------------------------------------------------------------------------------------------------- threads
@pytest.mark.parametrize("sample", [False, True])
def test_concurrent_generate_gives_the_serial_results(engine, sample):
    assert engine._get_decoder() is not None
    calls = []
    for j in range(12):
        ids, mask = left_pad(prompts([3 + j % 4, 6 - j % 3], seed=100 + j), pad=2)
        kw = dict(attention_mask=mask, max_new_tokens=6 + j % 3, eos_token_id=[])
        if sample:
            kw.update(do_sample=True, temperature=0.8, seed=j)
        calls.append((ids[: 1 + j % 2], {**kw, "attention_mask": mask[: 1 + j % 2]}))
    serial = [engine.generate(ids, **kw) for ids, kw in calls]
    results, errors = {}, []
    barrier = threading.Barrier(4)

    def worker(w):
        try:
            barrier.wait()
            for rep in range(2):
                for i in range(w, len(calls), 4):
                    results[(i, rep)] = engine.generate(calls[i][0], **calls[i][1])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 2 * len(calls)
    for (i, _), got in results.items():
        assert torch.equal(got, serial[i]), i


def test_concurrent_hf_fallback_and_forward_give_the_serial_results(injected):
    _, engine = injected("llama", replace_with_kernel_inject=False)
    assert engine._get_decoder() is None
    inputs = [prompts([5], seed=200 + j)[0][None] for j in range(6)]
    serial = [engine.generate(x, max_new_tokens=4, do_sample=False) for x in inputs]
    fwd = [engine(x).logits for x in inputs]
    out, errors = {}, []

    def worker(i):
        try:
            out[i] = (engine.generate(inputs[i], max_new_tokens=4, do_sample=False), engine(inputs[i]).logits)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for i, (g, f) in out.items():
        assert torch.equal(g, serial[i]) and torch.equal(f, fwd[i])


def test_engine_with_its_lock_deep_copies(engine):
    import copy

    ids = prompts([4], seed=1)[0][None]
    twin = copy.deepcopy(engine)
    assert torch.equal(twin.generate(ids, max_new_tokens=3), engine.generate(ids, max_new_tokens=3))


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kw, exc, name", [
    (dict(do_sample=True, temperature=0.0), ValueError, "`temperature`"),
    (dict(do_sample=True, temperature=-1.0), ValueError, "`temperature`"),
    (dict(do_sample=True, temperature=float("nan")), ValueError, "`temperature`"),
    (dict(do_sample=True, temperature="hot"), ValueError, "`temperature`"),
    (dict(do_sample=True, top_k=-1), ValueError, "`top_k`"),
    (dict(do_sample=True, top_k=1.5), ValueError, "`top_k`"),
    (dict(do_sample=True, top_p=-0.1), ValueError, "`top_p`"),
    (dict(do_sample=True, top_p=1.5), ValueError, "`top_p`"),
    (dict(do_sample=True, min_p=1.5), ValueError, "`min_p`"),
    (dict(repetition_penalty=0.0), ValueError, "`repetition_penalty`"),
    (dict(max_new_tokens=0), ValueError, "`max_new_tokens`"),
    (dict(max_new_tokens=-1), ValueError, "`max_new_tokens`"),
    (dict(max_new_tokens=2.5), TypeError, "`max_new_tokens`"),
    (dict(max_length=4, max_new_tokens=None), ValueError, "`max_length`"),
    (dict(num_return_sequences=2), ValueError, "`num_return_sequences`"),
    (dict(num_return_sequences=0, do_sample=True), ValueError, "`num_return_sequences`"),
    (dict(pad_token_id=-1), ValueError, "`pad_token_id`"),
    (dict(eos_token_id=256), ValueError, "`eos_token_id`"),
    (dict(do_sample="yes"), TypeError, "`do_sample`"),
    (dict(foo=1), ValueError, "foo"),
    (dict(num_beams=2), UnsupportedError, "num_beams=2"),
    (dict(logits_processor=[lambda i, s: s]), UnsupportedError, "logits_processor"),
])
def test_parameters_are_validated_like_hf(engine, kw, exc, name):
    ids = prompts([4], seed=2)[0][None]
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(exc, match=name.replace("[", r"\[")):
        engine.generate(ids, **kw)


def test_temperature_zero_is_fine_for_greedy_and_top_k_0_disables(engine):
    ids = prompts([4], seed=3)[0][None]
    greedy = engine.generate(ids, max_new_tokens=5)
    assert torch.equal(engine.generate(ids, max_new_tokens=5, temperature=0.0), greedy)
    a = engine.generate(ids, max_new_tokens=5, do_sample=True, top_k=0, seed=1)
    assert torch.equal(a, engine.generate(ids, max_new_tokens=5, do_sample=True, top_k=0, seed=1))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(injected, penalty):
    reference, engine = injected("llama")
    ids, mask = left_pad(prompts([5, 8], seed=4, high=40), pad=2)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  repetition_penalty=penalty)
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=penalty)
    assert torch.equal(got, expected)


def test_min_p_warp_matches_hf():
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    from policyinject.decode.sampling import warp

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = MinPLogitsWarper(0.2)(None, TemperatureLogitsWarper(0.7)(None, logits))
    assert torch.equal(warp(logits, temperature=0.7, min_p=0.2).isinf(), expected.isinf())


def test_num_return_sequences_repeats_each_prompt(engine):
    ids, mask = left_pad(prompts([3, 5], seed=5), pad=2)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, num_return_sequences=3,
                          seed=0, eos_token_id=[])
    assert out.shape == (6, 9)
    assert torch.equal(out[:, :5], ids.repeat_interleave(3, dim=0))


# ------------------------------------------------------------------------------------ non-finite logits
@pytest.mark.parametrize("sample", [False, True])
def test_nan_logits_raise_instead_of_token_zero(engine, sample):
    ids = prompts([4], seed=6)[0][None]
    head = engine.module.lm_head.weight
    with torch.no_grad():
        head[7].fill_(float("nan"))
    kw = dict(do_sample=True, seed=0) if sample else {}
    with pytest.raises(NonFiniteLogitsError, match="NaN"):
        engine.generate(ids, max_new_tokens=5, **kw)
    assert issubclass(NonFiniteLogitsError, FloatingPointError)


def test_nan_arising_mid_generation_is_caught(engine):
    """A NaN in one embedding row: fine until the model generates that token, then the flag trips."""
    ids = prompts([4], seed=7)[0][None]
    free = engine.generate(ids, max_new_tokens=8, eos_token_id=[])[0].tolist()
    firsts = [k for k in range(5, 12) if free[k] not in free[:k]]  # generated tokens never fed before
    assert firsts, free
    tok = free[firsts[0]]
    with torch.no_grad():
        engine.module.model.embed_tokens.weight[tok].fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError):
        engine.generate(ids, max_new_tokens=8, eos_token_id=[])


# --------------------------------------------------------------------------------------- prompt edges
@pytest.mark.parametrize("ids, kw, exc, match", [
    (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "holds no prompt"),
    (torch.zeros(0, 5, dtype=torch.long), {}, ValueError, "holds no prompt"),
    (torch.tensor([[5.0, 6.0]]), {}, TypeError, "integer token ids.*float32"),
    (torch.tensor([[True, False]]), {}, TypeError, "integer token ids"),
    ([[5, 6]], {}, TypeError, "`input_ids` must be a torch.Tensor"),
    (torch.tensor([5, 6, 7]), {}, ValueError, r"input_ids\[None\]"),
    (torch.tensor([[5, 6, 7]]), dict(attention_mask=[[1, 1, 1]]), TypeError, "`attention_mask` must be a torch.Tensor"),
    (torch.tensor([[5, 6, 7]]), dict(attention_mask=torch.ones(1, 2)), ValueError, r"shape \(1, 2\).*\(1, 3\)"),
    (torch.tensor([[5, 6, 7]]), dict(attention_mask=torch.tensor([[1, 2, 1]])), ValueError, "only 0 and 1"),
    (torch.tensor([[5, 6, 7], [3, 3, 3]]), dict(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), ValueError,
     r"row\(s\) \[1\] are padding everywhere"),
    (torch.tensor([[5, 6, 7]]), dict(attention_mask=torch.tensor([[1, 1, 0]])), ValueError, "right padding"),
    (torch.tensor([[5, 256, 7]]), {}, ValueError, r"vocabulary \[0, 256\): largest 256 at row 0, column 1"),
    (torch.tensor([[5, -1, 7]]), {}, ValueError, "smallest -1"),
    (torch.tensor([[5, 6, 2]]), {}, ValueError, "inferred from the positions of pad_token_id=2"),
])
def test_malformed_prompts_are_clear_errors(engine, ids, kw, exc, match):
    with pytest.raises(exc, match=match):
        engine.generate(ids, max_new_tokens=2, **kw)


def test_int32_ids_and_bool_or_float_masks_are_accepted(engine):
    ids = prompts([5], seed=8)[0][None]
    expected = engine.generate(ids, max_new_tokens=4)
    assert torch.equal(engine.generate(ids.int(), max_new_tokens=4), expected)
    for mask in (torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 5)):
        assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=4), expected)


# -------------------------------------------------------------------------------------------- streamer
class Collect:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value)

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("sample", [False, True])
def test_streamer_gets_prompt_then_each_token_then_end_like_hf(injected, sample):
    reference, engine = injected("llama")
    ids = prompts([5], seed=9)[0][None]
    kw = dict(max_new_tokens=7, eos_token_id=[])
    ours, theirs = Collect(), Collect()
    if sample:
        kw.update(do_sample=True, seed=3)
    out = engine.generate(ids, streamer=ours, **kw)
    assert torch.equal(out, engine.generate(ids, **kw))  # streaming changes nothing
    if not sample:
        reference.generate(ids, streamer=theirs, do_sample=False, **kw)
        assert [p.tolist() for p in ours.puts] == [p.tolist() for p in theirs.puts]
    assert torch.equal(ours.puts[0], ids) and ours.ended == 1 and len(ours.puts) == 1 + 7
    assert torch.equal(torch.stack(ours.puts[1:], dim=1), out[:, 5:])
    assert all(p.device.type == "cpu" for p in ours.puts)


def test_streamer_stops_at_eos_like_hf(injected):
    reference, engine = injected("llama")
    ids = prompts([5], seed=10)[0][None]
    free = engine.generate(ids, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, 5 + 2])
    ours, theirs = Collect(), Collect()
    engine.generate(ids, max_new_tokens=10, eos_token_id=eos, streamer=ours)
    reference.generate(ids, max_new_tokens=10, eos_token_id=eos, do_sample=False, streamer=theirs)
    assert [p.tolist() for p in ours.puts] == [p.tolist() for p in theirs.puts]


def test_text_iterator_streamer_from_a_thread(engine):
    from transformers import TextIteratorStreamer

    class Tok:  # the two methods TextIteratorStreamer calls
        def decode(self, ids, **kw):
            return "".join(f"<{i}>" for i in ids)

    streamer = TextIteratorStreamer(Tok(), skip_prompt=True, timeout=60)
    ids = prompts([4], seed=11)[0][None]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("ids", engine.generate(ids, max_new_tokens=5,
                                                                               eos_token_id=[], streamer=streamer)))
    t.start()
    text = "".join(streamer)
    t.join()
    assert text == "".join(f"<{i}>" for i in out["ids"][0, 4:].tolist())


def test_bad_streamer_and_failing_call_release_the_consumer(engine):
    ids = prompts([4], seed=12)[0][None]
    with pytest.raises(TypeError, match="streamer.*put"):
        engine.generate(ids, max_new_tokens=2, streamer=object())
    s = Collect()
    with torch.no_grad():
        engine.module.lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError):
        engine.generate(ids, max_new_tokens=3, streamer=s)
    assert s.ended == 1


@pytest.mark.gpu
def test_streamer_on_cuda_graphs_gives_the_graph_tokens_and_reports_its_cost(capsys):
    """On the graphed path the streamer gets each step's token; prints the per-token cost of its sync."""
    import time

    from pi_testing import _init_inference

    from policyinject.testing.presets import tiny_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = _init_inference()(tiny_model("llama").cuda(), replace_with_kernel_inject=True, dtype="fp32",
                               enable_cuda_graph=True)
    ids = prompts([16], seed=13)[0][None].cuda()
    kw = dict(max_new_tokens=128, eos_token_id=[])
    plain = engine.generate(ids, **kw)
    s = Collect()
    assert torch.equal(engine.generate(ids, streamer=s, **kw), plain)
    assert torch.equal(torch.stack(s.puts[1:], dim=1), plain[:, 16:].cpu())
    times = {}
    for name, extra in (("none", {}), ("streamer", {"streamer": Collect()})):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            engine.generate(ids, **kw, **extra)
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t0) / 5 / 128 * 1e6
    with capsys.disabled():
        print(f"\nper token: {times['none']:.1f} us without a streamer, {times['streamer']:.1f} us with "
              f"({torch.cuda.get_device_name()}, torch {torch.__version__})")


@pytest.mark.gpu
def test_prompt_checks_copy_each_tensor_to_the_host_once():
    """Checking a prompt on the GPU synchronises once per tensor (its copy to the host), not once per check:
    every synchronisation before the prefill adds to the time to the first token."""
    import warnings

    from policyinject.decode.generate import _default_mask
    from policyinject.decode.params import resolve_params
    from policyinject.decode.validate import check_inputs, check_mask

    ids = torch.randint(3, 100, (2, 16), device="cuda")
    ids[1, :4] = 0
    mask = torch.ones_like(ids)
    params = resolve_params(16, dict(max_new_tokens=1, pad_token_id=0), None, None, ids.device, vocab_size=100)
    counts = []
    for case in ((ids, mask), (ids, None)):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got_ids, got_mask = check_inputs(*case, vocab_size=100)
                if got_mask is None:
                    got_mask = check_mask(_default_mask(got_ids, params), got_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
        assert got_mask.device == ids.device
    assert counts == [2, 2], counts
    assert _default_mask(ids, params)[1, :4].eq(0).all()
