"""Every built-in family, kernel-injected, against Hugging Face (tiny random models, fp32, CPU):

- the injected forward's logits within 1e-5 (max abs) of the original's, every layer an ``InjectedBlock``;
- ``engine.generate`` runs the decode engine (static KV cache; not Hugging Face's loop) and gives the same
  greedy tokens as the original model's ``generate`` (8 new tokens);
- on a GPU (``@pytest.mark.gpu``), the same in fp16/bf16 (logits by relative error, first tokens equal).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from policyinject.testing.presets import TINY_ARCHS, available, tiny_model

from pi_testing import _init_inference, rel_err

#: Families whose model the decode engine runs (every decoder-only family with whole-layer injection).
FAMILIES = [a for a in TINY_ARCHS if a not in ("bert", "mixtral") and available(a)]


def _ids(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _inject(model: torch.nn.Module, **config):
    original = copy.deepcopy(model)
    engine = _init_inference()(model, replace_with_kernel_inject=True, dtype=config.pop("dtype", "fp32"),
                               kernel_backend="torch", **config)
    return original, engine


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_logits_and_fast_generate(arch):
    model = tiny_model(arch)
    original, engine = _inject(model)
    blocks = sum(type(m).__name__ == "InjectedBlock" for m in model.modules())
    assert blocks == model.config.num_hidden_layers, f"{arch}: {blocks} injected blocks"
    ids = _ids(2, 9)
    with torch.no_grad():
        err = (model(ids).logits - original(ids).logits).abs().max().item()
    assert err <= 1e-5, f"{arch}: max abs logit difference {err:.2e}"

    prompt = _ids(1, 6, seed=2)
    with torch.no_grad():
        want = original.generate(prompt, max_new_tokens=8, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback notice would fail here
        decoder = engine._get_decoder()
    assert decoder is not None, f"{arch}: engine.generate would not use the decode engine"
    calls = []
    original_generate = decoder.generate
    decoder.generate = lambda *a, **k: calls.append(1) or original_generate(*a, **k)
    got = engine.generate(prompt, max_new_tokens=8, do_sample=False)
    assert calls, f"{arch}: engine.generate did not run the decode engine"
    assert torch.equal(got, want), (arch, got, want)


@pytest.mark.parametrize("arch", ["gemma2", "granite", "olmo2", "starcoder2"])
def test_family_left_padded_batch_generate(arch):
    model = tiny_model(arch)
    original, engine = _inject(model)
    ids = _ids(2, 7, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = original.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(got, want), (arch, got, want)


def test_unrun_model_part_falls_back_with_a_notice():
    """OPT with word_embed_proj_dim != hidden_size: project_in/project_out are not run by the decode engine,
    so engine.generate says so once and uses Hugging Face generate (same tokens as the original)."""
    model = tiny_model("opt", word_embed_proj_dim=32)
    original, engine = _inject(model)
    prompt = _ids(1, 6, seed=3)
    with torch.no_grad():
        want = original.generate(prompt, max_new_tokens=5, do_sample=False)
    with pytest.warns(UserWarning, match="project_out"):
        got = engine.generate(prompt, max_new_tokens=5, do_sample=False)
    with pytest.warns(UserWarning, match="project_out"):
        assert engine._get_decoder() is None
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_family_gpu_half_precision(arch, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    model = tiny_model(arch, device="cuda")
    reference = copy.deepcopy(model).to(torch_dtype)
    engine = _init_inference()(model, replace_with_kernel_inject=True, dtype=dtype)
    ids = _ids(2, 9).cuda()
    with torch.no_grad():
        err = rel_err(model(ids).logits.float(), reference(ids).logits.float())
    assert err < 2e-2, f"{arch} {dtype}: rel error {err:.2e}"
    prompt = _ids(1, 6, seed=2).cuda()
    want = reference.generate(prompt, max_new_tokens=4, do_sample=False)
    got = engine.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(got[:, :7], want[:, :7]), (arch, dtype)
