"""Built-in policy: Phi (Phi-1/1.5/2: ``PhiDecoderLayer``, ``PhiForCausalLM``, ``PhiModel``).

Parallel block with one LayerNorm (``input_layernorm``) feeding both attention and MLP:
``out = x + attn(ln(x)) + mlp(ln(x))``. The output projection is ``self_attn.dense`` (not ``o_proj``).
Partial rotary (``partial_rotary_factor``): the model's rotary tables cover only the rotated dims, and the
injected attention rotates exactly those. Plain GELU-tanh MLP (``gelu_new``), ``fc1``/``fc2`` with biases.
Configs with ``qk_layernorm=True`` have per-head LayerNorms this policy does not name; kernel injection
refuses them rather than drop the norms.

Example:
    >>> PHI_LAYER.block.value, PHI_LAYER.attention.o
    ('parallel', 'dense')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.phi.modeling_phi."

PHI_LAYER = Policy(
    layer=_M + "PhiDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="dense", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", fc1="fc1", fc2="fc2", activation="gelu_tanh"),
    norms=(NormSpec("input_layernorm", "layer"),),
    block="parallel",
    input_norm="input_layernorm",
)

PHI_CAUSAL_LM = ModelPolicy(model=_M + "PhiForCausalLM", layers="model.layers", embed="model.embed_tokens",
                            final_norm=NormSpec("model.final_layernorm", "layer"), lm_head="lm_head",
                            rotary_emb="model.rotary_emb")
PHI_MODEL = ModelPolicy(model=_M + "PhiModel", layers="layers", embed="embed_tokens",
                        final_norm=NormSpec("final_layernorm", "layer"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (PHI_LAYER, PHI_CAUSAL_LM, PHI_MODEL):
        register(policy)
