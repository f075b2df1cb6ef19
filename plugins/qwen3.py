"""Built-in policy: Qwen3 (``Qwen3DecoderLayer``, ``Qwen3ForCausalLM``, ``Qwen3Model``).

Llama wiring plus per-head RMSNorms on q and k (``self_attn.q_norm``/``k_norm``, over ``head_dim``), applied
before rotary; ``head_dim`` comes from the config (it need not be hidden / heads).

Example:
    >>> QWEN3_LAYER.attention.q_norm
    'q_norm'
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.qwen3.modeling_qwen3."

QWEN3_LAYER = Policy(
    layer=_M + "Qwen3DecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            q_norm="q_norm", k_norm="k_norm",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

QWEN3_CAUSAL_LM = ModelPolicy(model=_M + "Qwen3ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                              rotary_emb="model.rotary_emb")
QWEN3_MODEL = ModelPolicy(model=_M + "Qwen3Model", layers="layers", embed="embed_tokens",
                          final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (QWEN3_LAYER, QWEN3_CAUSAL_LM, QWEN3_MODEL):
        register(policy)
