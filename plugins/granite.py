"""Built-in policy: Granite (``GraniteDecoderLayer``, ``GraniteForCausalLM``, ``GraniteModel``).

Llama wiring with four scalar multipliers from the config, each declared here so that the decode engine
applies them too: ``embedding_multiplier`` (``ModelPolicy.embed_scale``), ``residual_multiplier`` on each
branch before its residual add (``Policy.residual_scale``), ``attention_multiplier`` as the attention scale
(``AttentionSpec.scale``) and ``logits_scaling`` dividing the logits (``ModelPolicy.logit_scale``).

Example:
    >>> GRANITE_LAYER.residual_scale, GRANITE_LAYER.attention.scale
    ('residual_multiplier', 'attention_multiplier')
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies


def _inverse_logits_scaling(config) -> float:
    return 1.0 / float(config.logits_scaling)


GRANITE_LAYER, GRANITE_CAUSAL_LM, GRANITE_MODEL = llama_like_policies(
    "transformers.models.granite.modeling_granite.", "Granite", scale="attention_multiplier",
    layer=dict(residual_scale="residual_multiplier"),
    model=dict(embed_scale="embedding_multiplier", logit_scale=_inverse_logits_scaling))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GRANITE_LAYER, GRANITE_CAUSAL_LM, GRANITE_MODEL):
        register(policy)
