"""Built-in policy: Llama (``LlamaDecoderLayer``, ``LlamaForCausalLM``, ``LlamaModel``).

Pre-norm block with RMSNorm; separate q/k/v/o projections (GQA via ``num_key_value_heads``); gated SiLU MLP;
rotate-half rotary computed once per forward by ``model.rotary_emb``.

Example:
    >>> LLAMA_LAYER.layer_name, LLAMA_LAYER.block.value
    ('LlamaDecoderLayer', 'pre_norm')
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

LLAMA_LAYER, LLAMA_CAUSAL_LM, LLAMA_MODEL = llama_like_policies("transformers.models.llama.modeling_llama.", "Llama")


@hookimpl
def policyinject_register_policies(register):
    for policy in (LLAMA_LAYER, LLAMA_CAUSAL_LM, LLAMA_MODEL):
        register(policy)
