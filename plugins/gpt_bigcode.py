"""Built-in policy: GPT-BigCode / StarCoder (``GPTBigCodeBlock``, ``GPTBigCodeForCausalLM``, ``GPTBigCodeModel``).

GPT-2's wiring (pre-norm LayerNorms ``ln_1``/``ln_2``, learned positions ``wpe``, tanh-GELU MLP
``c_fc``/``c_proj``) on ``nn.Linear`` projections, with multi-query attention: the fused ``attn.c_attn`` has
rows ``[q (H*d) | k (d) | v (d)]`` (``blocks`` with one KV head). A config with ``multi_query=False`` packs
``[q_h | k_h | v_h]`` per head (``per_head``); the ``policyinject_select_policy`` hook picks the variant.
Blocks built with cross-attention are injected submodule by submodule.

Example:
    >>> class C: multi_query = False
    >>> variant_for(C()).attention.qkv_layout.value
    'per_head'
"""

from typing import Any

import attrs

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.gpt_bigcode.modeling_gpt_bigcode."


def kv_heads(config: Any) -> int:
    """1 for multi-query, else as many as query heads."""
    return 1 if getattr(config, "multi_query", True) else int(config.n_head)


GPT_BIGCODE_MQA = Policy(
    layer=_M + "GPTBigCodeBlock",
    attention=AttentionSpec(module="attn", qkv="c_attn", qkv_layout="blocks", o="c_proj", num_heads=("n_head",),
                            num_kv_heads=kv_heads, tp_attributes={"num_heads": "heads"}),
    mlp=MLPSpec(module="mlp", fc1="c_fc", fc2="c_proj", activation="gelu_tanh"),
    norms=(NormSpec("ln_1", "layer"), NormSpec("ln_2", "layer")),
    block="pre_norm",
    input_norm="ln_1",
    post_attention_norm="ln_2",
)
GPT_BIGCODE_MHA = attrs.evolve(GPT_BIGCODE_MQA, attention=attrs.evolve(GPT_BIGCODE_MQA.attention, qkv_layout="per_head"))


def variant_for(config: Any) -> Policy:
    """The policy for a GPT-BigCode config: multi-query (default) or multi-head."""
    return GPT_BIGCODE_MQA if getattr(config, "multi_query", True) else GPT_BIGCODE_MHA


GPT_BIGCODE_CAUSAL_LM = ModelPolicy(model=_M + "GPTBigCodeForCausalLM", layers="transformer.h", embed="transformer.wte",
                                    position_embed="transformer.wpe", final_norm=NormSpec("transformer.ln_f", "layer"),
                                    lm_head="lm_head")
GPT_BIGCODE_MODEL = ModelPolicy(model=_M + "GPTBigCodeModel", layers="h", embed="wte", position_embed="wpe",
                                final_norm=NormSpec("ln_f", "layer"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GPT_BIGCODE_MQA, GPT_BIGCODE_MHA, GPT_BIGCODE_CAUSAL_LM, GPT_BIGCODE_MODEL):
        register(policy)


@hookimpl
def policyinject_select_policy(module, path, candidates):
    """Pick the variant for a ``GPTBigCodeBlock`` from its attention's ``multi_query``; None otherwise."""
    if type(module).__name__ != "GPTBigCodeBlock":
        return None
    attn = getattr(module, "attn", None)
    wanted = GPT_BIGCODE_MQA if getattr(attn, "multi_query", True) else GPT_BIGCODE_MHA
    for candidate in candidates:
        if candidate.attention == wanted.attention:
            return candidate
    return None
