"""Built-in policy: SmolLM3 (``SmolLM3DecoderLayer``, ``SmolLM3ForCausalLM``, ``SmolLM3Model``).

Llama wiring (pre-norm RMSNorm block, separate q/k/v/o, gated SiLU MLP, rotate-half rotary). Every few layers are NoPE layers (``no_rope_layers``): their attention has ``use_rope=False``, named by ``rotary_switch``, and the injected attention skips rotary there.

Example:
    >>> SMOLLM3_LAYER.layer_name
    'SmolLM3DecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

SMOLLM3_LAYER, SMOLLM3_CAUSAL_LM, SMOLLM3_MODEL = llama_like_policies("transformers.models.smollm3.modeling_smollm3.", "SmolLM3", rotary_switch="use_rope")


@hookimpl
def policyinject_register_policies(register):
    for policy in (SMOLLM3_LAYER, SMOLLM3_CAUSAL_LM, SMOLLM3_MODEL):
        register(policy)
