"""Built-in policy: GPT-NeoX / Pythia (``GPTNeoXLayer``, ``GPTNeoXForCausalLM``, ``GPTNeoXModel``).

Fused ``attention.query_key_value`` with rows interleaved **per head** ``[q_h | k_h | v_h]`` (the
``per_head`` layout; as many KV heads as query heads); output ``attention.dense``; partial rotary
(``rotary_pct``: the model's tables cover the rotated dims only). Parallel residual by default
(``use_parallel_residual=True``: ``out = x + attn(ln1(x)) + mlp(ln2(x))``, two LayerNorms); a layer with
``use_parallel_residual=False`` is injected as a pre-norm block. Plain exact-GELU MLP.

Example:
    >>> GPT_NEOX_LAYER.attention.qkv_layout.value
    'per_head'
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.gpt_neox.modeling_gpt_neox."

GPT_NEOX_LAYER = Policy(
    layer=_M + "GPTNeoXLayer",
    attention=AttentionSpec(module="attention", qkv="query_key_value", qkv_layout="per_head", o="dense",
                            rotary="half", num_kv_heads=("num_attention_heads",)),
    mlp=MLPSpec(module="mlp", fc1="dense_h_to_4h", fc2="dense_4h_to_h", activation="gelu"),
    norms=(NormSpec("input_layernorm", "layer"), NormSpec("post_attention_layernorm", "layer")),
    block="parallel",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

GPT_NEOX_CAUSAL_LM = ModelPolicy(model=_M + "GPTNeoXForCausalLM", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
                                 final_norm=NormSpec("gpt_neox.final_layer_norm", "layer"), lm_head="lm_head",
                                 rotary_emb="gpt_neox.rotary_emb")
GPT_NEOX_MODEL = ModelPolicy(model=_M + "GPTNeoXModel", layers="layers", embed="embed_in",
                             final_norm=NormSpec("final_layer_norm", "layer"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (GPT_NEOX_LAYER, GPT_NEOX_CAUSAL_LM, GPT_NEOX_MODEL):
        register(policy)
