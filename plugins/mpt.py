"""Built-in policy: MPT (``MptBlock``, ``MptForCausalLM``, ``MptModel``).

Pre-norm block with bias-free LayerNorms ``norm_1``/``norm_2``; fused ``attn.Wqkv`` with rows
``[q | k | v]`` (``blocks``), output ``out_proj``; ALiBi (``attn_config.alibi_bias_max``), the softmax scale
``attn_config.softmax_scale`` and the clamp ``attn_config.clip_qkv`` read from the config; a plain exact-GELU
MLP ``ffn.up_proj``/``ffn.down_proj``. MPT's model hands its layers a boolean mask that is True where
attention is blocked (``inverted_bool_mask``).

Example:
    >>> MPT_LAYER.attention.qkv_layout.value, MPT_LAYER.attention.inverted_bool_mask
    ('blocks', True)
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.mpt.modeling_mpt."


def softmax_scale(config) -> float:
    """``attn_config.softmax_scale``, else ``head_dim ** -0.5``."""
    scale = getattr(config.attn_config, "softmax_scale", None)
    return float(scale) if scale is not None else (config.d_model / config.n_heads) ** -0.5


MPT_LAYER = Policy(
    layer=_M + "MptBlock",
    attention=AttentionSpec(module="attn", qkv="Wqkv", qkv_layout="blocks", o="out_proj", alibi=True,
                            alibi_max_bias="attn_config.alibi_bias_max", scale=softmax_scale,
                            clip_qkv="attn_config.clip_qkv", inverted_bool_mask=True,
                            num_heads=("n_heads",), num_kv_heads=("n_heads",), tp_attributes={"n_heads": "heads"}),
    mlp=MLPSpec(module="ffn", fc1="up_proj", fc2="down_proj", activation="gelu"),
    norms=(NormSpec("norm_1", "layer"), NormSpec("norm_2", "layer")),
    block="pre_norm",
    input_norm="norm_1",
    post_attention_norm="norm_2",
)

MPT_CAUSAL_LM = ModelPolicy(model=_M + "MptForCausalLM", layers="transformer.blocks", embed="transformer.wte",
                            final_norm=NormSpec("transformer.norm_f", "layer"), lm_head="lm_head")
MPT_MODEL = ModelPolicy(model=_M + "MptModel", layers="blocks", embed="wte", final_norm=NormSpec("norm_f", "layer"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (MPT_LAYER, MPT_CAUSAL_LM, MPT_MODEL):
        register(policy)
