"""Built-in policy: Llama (``LlamaDecoderLayer``, ``LlamaForCausalLM``, ``LlamaModel``).

Pre-norm block with RMSNorm; separate q/k/v/o projections (GQA via ``num_key_value_heads``); gated SiLU MLP;
rotate-half rotary computed once per forward by ``model.rotary_emb``.

Example:
    >>> LLAMA_LAYER.layer_name, LLAMA_LAYER.block.value
    ('LlamaDecoderLayer', 'pre_norm')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.llama.modeling_llama."

LLAMA_LAYER = Policy(
    layer=_M + "LlamaDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

LLAMA_CAUSAL_LM = ModelPolicy(model=_M + "LlamaForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                              rotary_emb="model.rotary_emb")
LLAMA_MODEL = ModelPolicy(model=_M + "LlamaModel", layers="layers", embed="embed_tokens",
                          final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (LLAMA_LAYER, LLAMA_CAUSAL_LM, LLAMA_MODEL):
        register(policy)
