"""Built-in policy: GLM (``GlmDecoderLayer``, ``GlmForCausalLM``, ``GlmModel``).

Llama wiring with **interleaved** rotary (pairs of adjacent dims) computed from rotate-half tables: the model's ``rotary_emb`` returns ``[f, f]`` tables and the attention re-lays out their first half (``rotary_tables="half"``). Partial rotary (``partial_rotary_factor``); q/k/v biases; a fused ``gate_up_proj``.

Example:
    >>> GLM_LAYER.attention.rotary, GLM_LAYER.attention.rotary_tables
    ('interleaved', 'half')
"""

from policyinject import hookimpl
from policyinject.policy import MLPSpec

from ._llama_like import llama_like_policies

GLM_LAYER, GLM_CAUSAL_LM, GLM_MODEL = llama_like_policies(
    "transformers.models.glm.modeling_glm.", "Glm", rotary="interleaved", rotary_tables="half", layer=dict(mlp=MLPSpec(module="mlp", gate_up="gate_up_proj", down="down_proj", activation="silu")))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GLM_LAYER, GLM_CAUSAL_LM, GLM_MODEL):
        register(policy)
