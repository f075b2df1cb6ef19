"""Built-in policy: Persimmon (``PersimmonDecoderLayer``, ``PersimmonForCausalLM``, ``PersimmonModel``).

Pre-norm LayerNorm block; fused ``self_attn.query_key_value`` with rows per head (``per_head``), output
``dense``; per-head LayerNorms on q and k (``q_layernorm``/``k_layernorm``, config ``qk_layernorm=True``, the
default); partial rotary (``partial_rotary_factor``: the model's tables cover the rotated dims only); a plain
squared-ReLU MLP (``relu2``). A config with ``qk_layernorm=False`` has no q/k norms; this policy then names
modules the layer lacks and planning refuses it with that message.

Example:
    >>> PERSIMMON_LAYER.attention.qkv_layout.value, PERSIMMON_LAYER.mlp.activation.value
    ('per_head', 'relu2')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.persimmon.modeling_persimmon."

PERSIMMON_LAYER = Policy(
    layer=_M + "PersimmonDecoderLayer",
    attention=AttentionSpec(module="self_attn", qkv="query_key_value", qkv_layout="per_head", o="dense",
                            rotary="half", q_norm="q_layernorm", k_norm="k_layernorm",
                            num_kv_heads=("num_attention_heads",), tp_attributes={"num_heads": "heads"}),
    mlp=MLPSpec(module="mlp", fc1="dense_h_to_4h", fc2="dense_4h_to_h", activation="relu2"),
    norms=(NormSpec("input_layernorm", "layer"), NormSpec("post_attention_layernorm", "layer")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

PERSIMMON_CAUSAL_LM = ModelPolicy(model=_M + "PersimmonForCausalLM", layers="model.layers", embed="model.embed_tokens",
                                  final_norm=NormSpec("model.final_layernorm", "layer"), lm_head="lm_head",
                                  rotary_emb="model.rotary_emb")
PERSIMMON_MODEL = ModelPolicy(model=_M + "PersimmonModel", layers="layers", embed="embed_tokens",
                              final_norm=NormSpec("final_layernorm", "layer"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (PERSIMMON_LAYER, PERSIMMON_CAUSAL_LM, PERSIMMON_MODEL):
        register(policy)
