"""The policies shared by Llama-shaped architectures (Llama, Mistral, Qwen2, Qwen3).

Pre-norm block with RMSNorm; separate q/k/v/o projections (GQA via ``num_key_value_heads``); gated SiLU MLP;
rotate-half rotary computed once per forward by ``model.rotary_emb``. Each family module passes its
transformers module path and class prefix, plus any extra attention roles (Qwen3's q/k norms).

Example:
    >>> layer, causal_lm, base = llama_like_policies("transformers.models.mistral.modeling_mistral.", "Mistral")
    >>> layer.layer_name, causal_lm.model_name, base.layers
    ('MistralDecoderLayer', 'MistralForCausalLM', 'layers')
"""

from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy


def llama_like_policies(module: str, prefix: str, **attention_extra) -> tuple:
    """``(layer policy, CausalLM model policy, base model policy)`` for ``{module}{prefix}DecoderLayer`` etc."""
    layer = Policy(
        layer=f"{module}{prefix}DecoderLayer",
        attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                                tp_attributes={"num_key_value_groups": "kv_groups"}, **attention_extra),
        mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
        norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
        block="pre_norm",
        input_norm="input_layernorm",
        post_attention_norm="post_attention_layernorm",
    )
    causal_lm = ModelPolicy(model=f"{module}{prefix}ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                            final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head", rotary_emb="model.rotary_emb")
    base = ModelPolicy(model=f"{module}{prefix}Model", layers="layers", embed="embed_tokens",
                       final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")
    return layer, causal_lm, base
