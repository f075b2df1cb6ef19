"""Built-in policy: Ministral (``MinistralDecoderLayer``, ``MinistralForCausalLM``, ``MinistralModel``).

Llama wiring (pre-norm RMSNorm block, separate q/k/v/o, gated SiLU MLP, rotate-half rotary). Sliding-window layers come from the config's ``layer_types``/``sliding_window`` (the masks HF builds; the decode engine reads the same).

Example:
    >>> MINISTRAL_LAYER.layer_name
    'MinistralDecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

MINISTRAL_LAYER, MINISTRAL_CAUSAL_LM, MINISTRAL_MODEL = llama_like_policies("transformers.models.ministral.modeling_ministral.", "Ministral")


@hookimpl
def policyinject_register_policies(register):
    for policy in (MINISTRAL_LAYER, MINISTRAL_CAUSAL_LM, MINISTRAL_MODEL):
        register(policy)
