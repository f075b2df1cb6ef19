"""Built-in policy: OPT (``OPTDecoderLayer``, ``OPTForCausalLM``, ``OPTModel``).

Pre-norm LayerNorm block (``self_attn_layer_norm``, ``final_layer_norm``) with learned positions
(``model.decoder.embed_positions``); the MLP has no module of its own: ``fc1``/``fc2`` (ReLU) sit on the
layer. The output projection is ``self_attn.out_proj``. OPT-350m (``do_layer_norm_before=False``) normalises
after each residual add; such layers are injected as post-norm blocks, and its model has no final norm.
The HF attention counts heads with ``num_heads`` (a tensor-parallel attribute).

Example:
    >>> OPT_LAYER.mlp.module, OPT_LAYER.mlp.fc1
    ('', 'fc1')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.opt.modeling_opt."

OPT_LAYER = Policy(
    layer=_M + "OPTDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
                            num_kv_heads=("num_attention_heads",), tp_attributes={"num_heads": "heads"}),
    mlp=MLPSpec(module="", fc1="fc1", fc2="fc2", activation="relu"),
    norms=(NormSpec("self_attn_layer_norm", "layer"), NormSpec("final_layer_norm", "layer")),
    block="pre_norm",
    input_norm="self_attn_layer_norm",
    post_attention_norm="final_layer_norm",
)

OPT_CAUSAL_LM = ModelPolicy(model=_M + "OPTForCausalLM", layers="model.decoder.layers",
                            embed="model.decoder.embed_tokens", position_embed="model.decoder.embed_positions",
                            final_norm=NormSpec("model.decoder.final_layer_norm", "layer"), lm_head="lm_head")
OPT_MODEL = ModelPolicy(model=_M + "OPTModel", layers="decoder.layers", embed="decoder.embed_tokens",
                        position_embed="decoder.embed_positions",
                        final_norm=NormSpec("decoder.final_layer_norm", "layer"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (OPT_LAYER, OPT_CAUSAL_LM, OPT_MODEL):
        register(policy)
