"""Built-in policy: Qwen2 (``Qwen2DecoderLayer``, ``Qwen2ForCausalLM``, ``Qwen2Model``).

Same wiring as Llama: pre-norm RMSNorm block, separate q/k/v/o (GQA), gated SiLU MLP, rotate-half rotary.
q/k/v carry biases (concatenated with the weights at injection).

Example:
    >>> QWEN2_LAYER.layer_name
    'Qwen2DecoderLayer'
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.qwen2.modeling_qwen2."

QWEN2_LAYER = Policy(
    layer=_M + "Qwen2DecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

QWEN2_CAUSAL_LM = ModelPolicy(model=_M + "Qwen2ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                              rotary_emb="model.rotary_emb")
QWEN2_MODEL = ModelPolicy(model=_M + "Qwen2Model", layers="layers", embed="embed_tokens",
                          final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (QWEN2_LAYER, QWEN2_CAUSAL_LM, QWEN2_MODEL):
        register(policy)
