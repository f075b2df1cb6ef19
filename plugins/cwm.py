"""Built-in policy: CWM (Code World Model) (``CwmDecoderLayer``, ``CwmForCausalLM``, ``CwmModel``).

Llama wiring (pre-norm RMSNorm block, separate q/k/v/o, gated SiLU MLP, rotate-half rotary). Sliding-window layers come from the config's ``layer_types``/``sliding_window`` (the masks HF builds; the decode engine reads the same).

Example:
    >>> CWM_LAYER.layer_name
    'CwmDecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

CWM_LAYER, CWM_CAUSAL_LM, CWM_MODEL = llama_like_policies("transformers.models.cwm.modeling_cwm.", "Cwm")


@hookimpl
def policyinject_register_policies(register):
    for policy in (CWM_LAYER, CWM_CAUSAL_LM, CWM_MODEL):
        register(policy)
