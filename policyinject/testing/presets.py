"""Model presets: Hugging Face models built from configs with random weights, no hub access.

Two kinds: realistic *shapes* for benchmarks and ``policyinject inspect`` (``llama-3.2-1b``,
``llama-3-8b``), and *tiny* models of every built-in architecture for tests (hidden 64, 2 layers).

Example:
    >>> from policyinject.testing.presets import tiny_model, TINY_ARCHS
    >>> model = tiny_model("llama")
    >>> type(model).__name__, model.config.num_hidden_layers
    ('LlamaForCausalLM', 2)
    >>> "gpt2" in TINY_ARCHS
    True
"""

from __future__ import annotations

from typing import Any

import torch

#: Shapes of real models, as keyword arguments of the transformers config class.
SHAPES: dict = {
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-3-8b": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5)),
}

_TINY_COMMON = dict(vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)

#: Tiny configs of every built-in architecture: (config class, model class, kwargs).
TINY: dict = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
        max_position_embeddings=128)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "bert": ("BertConfig", "BertModel", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2)),
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4)),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
    "cwm": ("CwmConfig", "CwmForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        no_rope_layers=[1, 0])),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=12, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        clip_qkv=0.5)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=4)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                                                attn_config={"clip_qkv": 0.5})),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(n_embd=64, n_layer=2, n_head=4,
                                                                      n_positions=128)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        use_qk_norm=True, logit_scale=0.5)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16)),
}

TINY_ARCHS = tuple(TINY)
PRESETS = tuple(SHAPES)


def _build(entry: tuple, overrides: dict, seed: int, dtype: torch.dtype, device: Any) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, kwargs = entry
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    cls = getattr(transformers, model_cls)
    with torch.device(device):
        try:  # build straight in the target dtype: an 8B model never exists in fp32
            model = cls._from_config(config, dtype=dtype)
        except TypeError:  # older transformers spell it torch_dtype
            model = cls._from_config(config, torch_dtype=dtype)
    return model.to(dtype).eval()


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu",
               **overrides: Any) -> torch.nn.Module:
    """A tiny random-weight model of a built-in architecture (hidden 64, 2 layers, vocab 256).

    Example:
        >>> tiny_model("gpt2").transformer.h[0].attn.c_attn.weight.shape
        torch.Size([64, 192])
    """
    if arch not in TINY:
        raise KeyError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY)}")
    config_cls, model_cls, kwargs = TINY[arch]
    common = {} if arch == "bert" else _TINY_COMMON
    if arch == "bert":
        common = dict(vocab_size=256, pad_token_id=0)
    return _build((config_cls, model_cls, {**common, **kwargs}), overrides, seed, dtype, device)


def preset_model(name: str, dtype: torch.dtype = torch.bfloat16, device: Any = "cpu", seed: int = 0,
                 **overrides: Any) -> torch.nn.Module:
    """A random-weight model with a real model's shape (``llama-3.2-1b``, ``llama-3-8b``, ``smollm2-135m``).

    Pass ``device="meta"`` to build without allocating (for ``policyinject inspect``).

    Example:
        >>> m = preset_model("llama-3-8b", device="meta")
        >>> sum(p.numel() for p in m.parameters()) // 10**6
        8030
    """
    if name not in SHAPES:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(SHAPES)}")
    return _build(SHAPES[name], overrides, seed, dtype, device)


def available(arch: str) -> bool:
    """True when this transformers version has the architecture's classes."""
    import transformers

    config_cls, model_cls, _ = TINY.get(arch) or SHAPES[arch]
    return hasattr(transformers, config_cls) and hasattr(transformers, model_cls)


