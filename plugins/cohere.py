"""Built-in policy: Cohere / Command-R (``CohereDecoderLayer``, ``CohereForCausalLM``, ``CohereModel``).

Parallel block with one bias-free LayerNorm (``CohereLayerNorm``): ``out = x + attn(ln(x)) + mlp(ln(x))``;
separate q/k/v/o; **interleaved** rotary (pairs of adjacent dims); gated SiLU MLP; the logits multiplied by
``logit_scale`` (``ModelPolicy.logit_scale``). Configs with ``use_qk_norm=True`` carry per-head LayerNorms
with a ``[heads, head_dim]`` weight, called on ``[B, T, H, D]`` (``qk_norm_layout="bthd"``); they are
described by :data:`COHERE_LAYER_QK_NORM`, picked by the ``policyinject_select_policy`` hook.

Example:
    >>> COHERE_LAYER.block.value, COHERE_LAYER.attention.rotary, COHERE_CAUSAL_LM.logit_scale
    ('parallel', 'interleaved', 'logit_scale')
"""

import attrs

from policyinject import hookimpl
from policyinject.policy import NormSpec

from ._llama_like import llama_like_policies

COHERE_LAYER, COHERE_CAUSAL_LM, COHERE_MODEL = llama_like_policies(
    "transformers.models.cohere.modeling_cohere.", "Cohere", rotary="interleaved",
    layer=dict(norms=(NormSpec("input_layernorm", "layer"),), block="parallel", post_attention_norm=None),
    model=dict(logit_scale="logit_scale"))
COHERE_LAYER_QK_NORM = attrs.evolve(COHERE_LAYER, attention=attrs.evolve(
    COHERE_LAYER.attention, q_norm="q_norm", k_norm="k_norm", qk_norm_layout="bthd"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (COHERE_LAYER, COHERE_LAYER_QK_NORM, COHERE_CAUSAL_LM, COHERE_MODEL):
        register(policy)


@hookimpl
def policyinject_select_policy(module, path, candidates):
    """Pick the q/k-norm variant for a ``CohereDecoderLayer`` whose attention has ``q_norm``."""
    if type(module).__name__ != "CohereDecoderLayer":
        return None
    wanted = COHERE_LAYER_QK_NORM if hasattr(getattr(module, "self_attn", None), "q_norm") else COHERE_LAYER
    for candidate in candidates:
        if candidate.attention == wanted.attention:
            return candidate
    return None
