"""Every built-in architecture, injected, matches the original model (tiny random-weight models, fp32, CPU).

- reference path (``kernel_backend="torch"``): logits within 1e-5 relative error by norm, same greedy tokens;
- Triton kernels under the interpreter (``kernel_backend="triton"``, ``TRITON_INTERPRET=1`` from the root
  conftest): logits within 1e-4, on 1 x 6 tokens (the interpreter costs milliseconds per program);
- padded batches (a 4-D mask) and cached decoding with that mask (the GQA single-token path).
"""

from __future__ import annotations

import pytest
import torch

from policyinject.testing.presets import TINY_ARCHS, available, tiny_model

from pi_testing import output_tensor, rel_err

ARCHS = [a for a in TINY_ARCHS if available(a)]
DECODERS = [a for a in ARCHS if a != "bert"]
TOL_REF = 1e-5
TOL_TRITON = 1e-4


def _ids(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, tokens), generator=g)


def _blocks(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "InjectedBlock" for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_reference_path(arch, inject):
    model = tiny_model(arch)
    original, engine = inject(model, kernel_backend="torch")
    assert engine.plan.for_pass("kernel_inject"), "kernel injection planned nothing"
    ids = _ids(2, 7)
    with torch.no_grad():
        err = rel_err(output_tensor(model(ids)), output_tensor(original(ids)))
    assert err < TOL_REF, f"{arch}: rel error {err:.2e}"
    assert _blocks(model) == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_same_tokens(arch, inject):
    model = tiny_model(arch)
    original, _ = inject(model, kernel_backend="torch")
    ids = _ids(1, 6, seed=2)
    with torch.no_grad():
        want = original.generate(ids, max_new_tokens=5, do_sample=False)
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_triton_kernels(arch, inject):
    model = tiny_model(arch)
    original, _ = inject(model, kernel_backend="triton")
    assert {m.backend for m in model.modules() if hasattr(m, "backend") and isinstance(m, torch.nn.Module)} == {"triton"}
    ids = _ids(1, 6, seed=3)
    with torch.no_grad():
        err = rel_err(output_tensor(model(ids)), output_tensor(original(ids)))
    assert err < TOL_TRITON, f"{arch}: rel error {err:.2e} with the Triton kernels"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon", "gpt_neox", "qwen3", "bert"])
def test_padded_batch_matches(arch, inject):
    model = tiny_model(arch)
    original, _ = inject(model, kernel_backend="torch")
    ids = _ids(2, 7, seed=4)
    mask = torch.ones_like(ids)
    if arch == "bert":
        mask[1, -3:] = 0  # right padding for the encoder
    else:
        mask[1, :3] = 0  # left padding for the decoders
    with torch.no_grad():
        a = output_tensor(model(ids, attention_mask=mask))
        b = output_tensor(original(ids, attention_mask=mask))
    keep = mask.bool()
    assert rel_err(a[keep], b[keep]) < TOL_REF


@pytest.mark.parametrize("arch", ["llama", "falcon", "mistral"])
def test_padded_generate_same_tokens(arch, inject):
    """Decoding a left-padded batch feeds a mask to every single-token step (GQA/MQA packed path)."""
    model = tiny_model(arch)
    original, _ = inject(model, kernel_backend="torch")
    ids = _ids(2, 6, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = original.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert torch.equal(got, want)


def test_block_run_matches_forward():
    """``run(hidden, cos, sin, attend)`` -- the decode engine's entry point -- equals the HF forward."""
    from policyinject.modules.attention import sdpa

    model = tiny_model("qwen3")
    from policyinject.passes.base import PassContext, ResolvedLayer
    from policyinject.passes.kernel_inject import KernelInjectPass
    from policyinject_plugins.qwen3 import QWEN3_LAYER

    layer = model.model.layers[0]
    from policyinject.config import load_config

    ctx = PassContext(model=model, config=load_config(None, replace_with_kernel_inject=True, kernel_backend="torch"),
                      layers=[ResolvedLayer("model.layers.0", layer, QWEN3_LAYER)], model_config=model.config)
    p = KernelInjectPass()
    p.apply(ctx, p.plan(ctx))
    block = model.model.layers[0]
    x = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None].expand(2, 5)
    cos, sin = model.model.rotary_emb(x, pos)
    seen = {}

    def attend(q, k, v):
        seen["shapes"] = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        return sdpa(q, k, v, None, causal=True)

    with torch.no_grad():
        want = layer(x, position_embeddings=(cos, sin))
        got = block.run(x, cos, sin, attend)
    assert seen["shapes"] == ((2, 4, 5, 16), (2, 2, 5, 16), (2, 2, 5, 16))
    assert rel_err(got, want) < TOL_REF
    assert ctx.plan.injection.blocks["model.layers.0"].kv_heads == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_static_cache_generate_same_tokens(arch, inject):
    """The HF ``StaticCache`` path: masks sized to the cache, ``cache.update`` writing in place."""
    model = tiny_model(arch)
    original, _ = inject(model, kernel_backend="torch")
    ids = _ids(1, 6, seed=6)
    with torch.no_grad():
        want = original.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
        got = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want)
