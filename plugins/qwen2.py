"""Built-in policy: Qwen2 (``Qwen2DecoderLayer``, ``Qwen2ForCausalLM``, ``Qwen2Model``).

Same wiring as Llama: pre-norm RMSNorm block, separate q/k/v/o (GQA), gated SiLU MLP, rotate-half rotary.
q/k/v carry biases (concatenated with the weights at injection).

Example:
    >>> QWEN2_LAYER.layer_name
    'Qwen2DecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

QWEN2_LAYER, QWEN2_CAUSAL_LM, QWEN2_MODEL = llama_like_policies("transformers.models.qwen2.modeling_qwen2.", "Qwen2")


@hookimpl
def policyinject_register_policies(register):
    for policy in (QWEN2_LAYER, QWEN2_CAUSAL_LM, QWEN2_MODEL):
        register(policy)
