"""Built-in policy: OLMo (``OlmoDecoderLayer``, ``OlmoForCausalLM``, ``OlmoModel``).

Llama wiring with OLMo's parameter-free LayerNorm (``OlmoLayerNorm``: no weight, no bias, epsilon 1e-5
fixed in its forward, so ``NormSpec.eps`` gives it) and optional clamping of q, k and v (``clip_qkv``).

Example:
    >>> OLMO_LAYER.norms[0].eps, OLMO_LAYER.attention.clip_qkv
    (1e-05, 'clip_qkv')
"""

from policyinject import hookimpl
from policyinject.policy import NormSpec

from ._llama_like import llama_like_policies


def _norm(path: str) -> NormSpec:
    return NormSpec(path, "layer", eps=1e-5)


OLMO_LAYER, OLMO_CAUSAL_LM, OLMO_MODEL = llama_like_policies(
    "transformers.models.olmo.modeling_olmo.", "Olmo", clip_qkv="clip_qkv",
    layer=dict(norms=(_norm("input_layernorm"), _norm("post_attention_layernorm"))))


@hookimpl
def policyinject_register_policies(register):
    for policy in (OLMO_LAYER, OLMO_CAUSAL_LM, OLMO_MODEL):
        register(policy)
