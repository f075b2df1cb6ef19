"""Built-in policy: Qwen3 (``Qwen3DecoderLayer``, ``Qwen3ForCausalLM``, ``Qwen3Model``).

Llama wiring plus per-head RMSNorms on q and k (``self_attn.q_norm``/``k_norm``, over ``head_dim``), applied
before rotary; ``head_dim`` comes from the config (it need not be hidden / heads).

Example:
    >>> QWEN3_LAYER.attention.q_norm
    'q_norm'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

QWEN3_LAYER, QWEN3_CAUSAL_LM, QWEN3_MODEL = llama_like_policies("transformers.models.qwen3.modeling_qwen3.", "Qwen3", q_norm="q_norm", k_norm="k_norm")


@hookimpl
def policyinject_register_policies(register):
    for policy in (QWEN3_LAYER, QWEN3_CAUSAL_LM, QWEN3_MODEL):
        register(policy)
