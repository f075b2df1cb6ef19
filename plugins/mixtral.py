"""Built-in policy: Mixtral (``MixtralDecoderLayer``, ``MixtralForCausalLM``, ``MixtralModel``).

Llama-style attention and RMSNorms; the MLP is a sparse mixture of experts (``mlp``:
``MixtralSparseMoeBlock``) whose experts are fused 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``), not linears. The layer policy names it as ``moe`` (the MLP slot of a
pre-norm block): kernel injection builds an ``InjectedBlock`` whose MLP is the injected MoE block.

``MIXTRAL_MOE`` describes the MoE block for :class:`policyinject.modules.moe.InjectedMoE`: softmax over the
experts in float32, top-2, the two weights renormalised to sum to 1 and applied in float32.

Example:
    >>> MIXTRAL_LAYER.mlp is None, MIXTRAL_LAYER.block.value, MIXTRAL_LAYER.moe is MIXTRAL_MOE
    (True, 'pre_norm', True)
    >>> MIXTRAL_MOE.block_name, MIXTRAL_MOE.router.normalize
    ('MixtralSparseMoeBlock', True)
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, ModelPolicy, NormSpec, Policy
from policyinject.policy.moe import ExpertsSpec, MoESpec, RouterSpec

_M = "transformers.models.mixtral.modeling_mixtral."

MIXTRAL_MOE = MoESpec(
    block=_M + "MixtralSparseMoeBlock",
    module="mlp",
    router=RouterSpec(module="gate", top_k="num_experts_per_tok", num_experts="num_local_experts",
                      order="softmax_topk", normalize=True, weights_dtype="float32"),
    experts=ExpertsSpec(module="experts", gate_up="gate_up_proj", down="down_proj", activation="silu"),
)

MIXTRAL_LAYER = Policy(
    layer=_M + "MixtralDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    moe=MIXTRAL_MOE,
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

MIXTRAL_CAUSAL_LM = ModelPolicy(model=_M + "MixtralForCausalLM", layers="model.layers", embed="model.embed_tokens",
                                final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                                rotary_emb="model.rotary_emb")
MIXTRAL_MODEL = ModelPolicy(model=_M + "MixtralModel", layers="layers", embed="embed_tokens",
                            final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (MIXTRAL_LAYER, MIXTRAL_CAUSAL_LM, MIXTRAL_MODEL):
        register(policy)
