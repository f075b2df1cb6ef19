"""The policies shared by Llama-shaped architectures (Llama, Mistral, Qwen2, Qwen3 and their relatives).

Pre-norm block with RMSNorm; separate q/k/v/o projections (GQA via ``num_key_value_heads``); gated SiLU MLP;
rotate-half rotary computed once per forward by ``model.rotary_emb``. Each family module passes its
transformers module path and class prefix, plus what differs: extra attention fields (Qwen3's q/k norms),
layer fields (Granite's residual scale) or model fields (Granite's embedding and logit scales).

Example:
    >>> layer, causal_lm, base = llama_like_policies("transformers.models.mistral.modeling_mistral.", "Mistral")
    >>> layer.layer_name, causal_lm.model_name, base.layers
    ('MistralDecoderLayer', 'MistralForCausalLM', 'layers')
"""

from typing import Optional

from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy


def llama_like_policies(module: str, prefix: str, *, layer: Optional[dict] = None, model: Optional[dict] = None,
                        base_prefix: Optional[str] = None, **attention_extra) -> tuple:
    """``(layer policy, CausalLM model policy, base model policy)`` for ``{module}{prefix}DecoderLayer`` etc.

    ``attention_extra`` are extra :class:`AttentionSpec` fields; ``layer`` overrides :class:`Policy` fields
    (``mlp``, ``norms``, ...); ``model`` adds :class:`ModelPolicy` fields to both model policies;
    ``base_prefix`` names the base model class when it is not ``{prefix}Model`` (Gemma-3's ``Gemma3TextModel``).
    """
    attention = dict(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                     tp_attributes={"num_key_value_groups": "kv_groups"})
    attention.update(attention_extra)
    fields = dict(
        layer=f"{module}{prefix}DecoderLayer",
        attention=AttentionSpec(**attention),
        mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
        norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
        block="pre_norm",
        input_norm="input_layernorm",
        post_attention_norm="post_attention_layernorm",
    )
    fields.update(layer or {})
    layer_policy = Policy(**fields)
    final = fields["norms"][0]
    extra = dict(model or {})
    final_norm = extra.pop("final_norm", None) or NormSpec("norm", final.kind, eps_attr=final.eps_attr,
                                                           weight_offset=final.weight_offset, eps=final.eps)
    causal_lm = ModelPolicy(model=f"{module}{prefix}ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                            final_norm=_prefixed(final_norm, "model."), lm_head="lm_head",
                            rotary_emb="model.rotary_emb", **extra)
    base = ModelPolicy(model=f"{module}{base_prefix or prefix}Model", layers="layers", embed="embed_tokens",
                       final_norm=final_norm, rotary_emb="rotary_emb", **extra)
    return layer_policy, causal_lm, base


def _prefixed(spec: NormSpec, prefix: str) -> NormSpec:
    import attrs

    return attrs.evolve(spec, path=prefix + spec.path)
