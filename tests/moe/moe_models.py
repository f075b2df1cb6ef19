"""Tiny random Hugging Face MoE models for the MoE tests (hidden 64, vocab 256), with well-spread routers."""

from __future__ import annotations

from typing import Any, Tuple

import torch

#: family -> (config class, model class, kwargs, MoESpec import path)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2), "policyinject_plugins.mixtral:MIXTRAL_MOE"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=3, decoder_sparse_step=1,
        mlp_only_layers=[1]), "policyinject_plugins.qwen_moe:QWEN2_MOE"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4, norm_topk_prob=True,
        head_dim=16), "policyinject_plugins.qwen_moe:QWEN3_MOE"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
        "policyinject_plugins.olmoe:OLMOE_MOE"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8),
        "policyinject_plugins.olmoe:GPT_OSS_MOE"),
}

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=128)


def moe_spec(family: str) -> Any:
    import importlib

    module, _, name = FAMILIES[family][3].partition(":")
    return getattr(importlib.import_module(module), name)


def tiny_moe_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
                   ) -> Tuple[torch.nn.Module, Any]:
    """``(model, moe_spec)``: a tiny model whose MoE weights are redrawn so routing is decisive."""
    import transformers

    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(config).eval()
    spec = moe_spec(family)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if spec.matches(mod):
                for name, p in mod.named_parameters():
                    std = 1.0 if name.startswith(("gate.", "router.")) else 0.1
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.to(dtype), spec
