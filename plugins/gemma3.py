"""Built-in policy: Gemma-3 text (``Gemma3DecoderLayer``, ``Gemma3ForCausalLM``, ``Gemma3TextModel``).

Gemma-2's wiring (sandwich norms, ``query_pre_attn_scalar``, optional soft-capping) plus per-head q/k
RMSNorms (``(1 + weight)``) and one rotary table per layer type: local (sliding) layers use
``rope_local_base_freq``, global layers ``rope_theta`` (``ModelPolicy.rotary_per_layer_type``: the model's
rotary module takes the layer type).

Example:
    >>> GEMMA3_LAYER.attention.q_norm, GEMMA3_CAUSAL_LM.rotary_per_layer_type
    ('q_norm', True)
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies
from .gemma2 import SANDWICH, query_scale

GEMMA3_LAYER, GEMMA3_CAUSAL_LM, GEMMA3_MODEL = llama_like_policies(
    "transformers.models.gemma3.modeling_gemma3.", "Gemma3", base_prefix="Gemma3Text", scale=query_scale,
    logit_softcap="attn_logit_softcapping", q_norm="q_norm", k_norm="k_norm", layer=SANDWICH,
    model=dict(final_logit_softcap="final_logit_softcapping", rotary_per_layer_type=True))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GEMMA3_LAYER, GEMMA3_CAUSAL_LM, GEMMA3_MODEL):
        register(policy)
