"""Built-in policy: Phi-3 (``Phi3DecoderLayer``, ``Phi3ForCausalLM``, ``Phi3Model``).

Pre-norm RMSNorm block like Llama, but the projections arrive fused: ``self_attn.qkv_proj`` with rows
``[q | k | v]`` (the ``blocks`` layout) and ``mlp.gate_up_proj`` with rows ``[gate | up]``; both are used as
they are. The HF attention slices ``qkv`` with ``num_key_value_heads`` (a tensor-parallel attribute).

Example:
    >>> PHI3_LAYER.attention.qkv, PHI3_LAYER.mlp.gate_up
    ('qkv_proj', 'gate_up_proj')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.phi3.modeling_phi3."

PHI3_LAYER = Policy(
    layer=_M + "Phi3DecoderLayer",
    attention=AttentionSpec(module="self_attn", qkv="qkv_proj", qkv_layout="blocks", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_heads": "kv_heads", "num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate_up="gate_up_proj", down="down_proj", activation="silu"),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

PHI3_CAUSAL_LM = ModelPolicy(model=_M + "Phi3ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                             final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                             rotary_emb="model.rotary_emb")
PHI3_MODEL = ModelPolicy(model=_M + "Phi3Model", layers="layers", embed="embed_tokens",
                         final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (PHI3_LAYER, PHI3_CAUSAL_LM, PHI3_MODEL):
        register(policy)
