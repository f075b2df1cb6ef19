"""Built-in policy: BLOOM (``BloomBlock``, ``BloomForCausalLM``, ``BloomModel``).

Pre-norm LayerNorm block; fused ``self_attention.query_key_value`` with rows interleaved per head
(``per_head``, as GPT-NeoX), output ``dense``; ALiBi position biases instead of rotary
(``AttentionSpec.alibi``: BLOOM's standard slopes); a plain tanh-GELU MLP. The embedding is followed by a
LayerNorm (``word_embeddings_layernorm``: ``ModelPolicy.embed_norm``). Layers built with
``apply_residual_connection_post_layernorm=True`` (the residual taken after the norm) are not described by
this policy: their plan keeps the layer's own forward for the residuals.

Example:
    >>> BLOOM_LAYER.attention.alibi, BLOOM_CAUSAL_LM.embed_norm.path
    (True, 'transformer.word_embeddings_layernorm')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.bloom.modeling_bloom."

BLOOM_LAYER = Policy(
    layer=_M + "BloomBlock",
    attention=AttentionSpec(module="self_attention", qkv="query_key_value", qkv_layout="per_head", o="dense",
                            alibi=True, num_heads=("n_head",), num_kv_heads=("n_head",),
                            tp_attributes={"num_heads": "heads"}),
    mlp=MLPSpec(module="mlp", fc1="dense_h_to_4h", fc2="dense_4h_to_h", activation="gelu_tanh"),
    norms=(NormSpec("input_layernorm", "layer"), NormSpec("post_attention_layernorm", "layer")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

BLOOM_CAUSAL_LM = ModelPolicy(model=_M + "BloomForCausalLM", layers="transformer.h",
                              embed="transformer.word_embeddings",
                              embed_norm=NormSpec("transformer.word_embeddings_layernorm", "layer"),
                              final_norm=NormSpec("transformer.ln_f", "layer"), lm_head="lm_head")
BLOOM_MODEL = ModelPolicy(model=_M + "BloomModel", layers="h", embed="word_embeddings",
                          embed_norm=NormSpec("word_embeddings_layernorm", "layer"),
                          final_norm=NormSpec("ln_f", "layer"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (BLOOM_LAYER, BLOOM_CAUSAL_LM, BLOOM_MODEL):
        register(policy)
