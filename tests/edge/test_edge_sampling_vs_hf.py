"""The sampling processors against Hugging Face's own (``transformers.generation.logits_process``), on random
and tie-heavy logits: the repetition penalty, temperature, top-k, top-p and min-p in Hugging Face's order
must keep exactly the tokens Hugging Face keeps, with the same scores (docs/decode.md promises its semantics).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policyinject.decode.sampling import penalize, warp

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper)


def _hf(logits, seen_ids, penalty, temperature, top_k, top_p, min_p):
    procs = LogitsProcessorList()
    if penalty is not None:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        procs.append(MinPLogitsWarper(min_p))
    return procs(seen_ids, logits.clone())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3), vocab=st.integers(2, 40), levels=st.sampled_from([None, 3]),
    seed=st.integers(0, 2**16), penalty=st.sampled_from([None, 0.7, 1.3]),
    temperature=st.sampled_from([1.0, 0.5, 2.0]), top_k=st.sampled_from([0, 1, 3, 50]),
    top_p=st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]), min_p=st.sampled_from([None, 0.0, 0.2, 1.0]),
)
def test_processors_keep_what_hugging_face_keeps(rows, vocab, levels, seed, penalty, temperature, top_k,
                                                  top_p, min_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g)
    if levels:  # many exact ties, the boundary cases of top-k / top-p / min-p
        logits = torch.round(logits * levels) / levels
    seen_ids = torch.randint(0, vocab, (rows, 4), generator=g)
    seen = torch.zeros(rows, vocab, dtype=torch.bool).scatter_(1, seen_ids, True)
    expected = _hf(logits, seen_ids, penalty, temperature, top_k, top_p, min_p)
    ours = penalize(logits, seen, penalty) if penalty is not None else logits
    ours = warp(ours, temperature, top_k or None, top_p, min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)
