"""Built-in policy: Mistral (``MistralDecoderLayer``, ``MistralForCausalLM``, ``MistralModel``).

Same wiring as Llama: pre-norm RMSNorm block, separate q/k/v/o (GQA), gated SiLU MLP, rotate-half rotary.
Sliding-window attention is carried by the mask the model builds for each layer.

Example:
    >>> MISTRAL_LAYER.layer_name
    'MistralDecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

MISTRAL_LAYER, MISTRAL_CAUSAL_LM, MISTRAL_MODEL = llama_like_policies("transformers.models.mistral.modeling_mistral.", "Mistral")


@hookimpl
def policyinject_register_policies(register):
    for policy in (MISTRAL_LAYER, MISTRAL_CAUSAL_LM, MISTRAL_MODEL):
        register(policy)
