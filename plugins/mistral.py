"""Built-in policy: Mistral (``MistralDecoderLayer``, ``MistralForCausalLM``, ``MistralModel``).

Same wiring as Llama: pre-norm RMSNorm block, separate q/k/v/o (GQA), gated SiLU MLP, rotate-half rotary.
Sliding-window attention is carried by the mask the model builds for each layer.

Example:
    >>> MISTRAL_LAYER.layer_name
    'MistralDecoderLayer'
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.mistral.modeling_mistral."

MISTRAL_LAYER = Policy(
    layer=_M + "MistralDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

MISTRAL_CAUSAL_LM = ModelPolicy(model=_M + "MistralForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                              rotary_emb="model.rotary_emb")
MISTRAL_MODEL = ModelPolicy(model=_M + "MistralModel", layers="layers", embed="embed_tokens",
                          final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (MISTRAL_LAYER, MISTRAL_CAUSAL_LM, MISTRAL_MODEL):
        register(policy)
