"""Built-in policy: OLMo-2 (``Olmo2DecoderLayer``, ``Olmo2ForCausalLM``, ``Olmo2Model``).

No norm before attention or MLP; instead RMSNorms on their outputs before each residual add
(``post_attention_layernorm``, ``post_feedforward_layernorm``: ``attention_output_norm``/``mlp_output_norm``):
``h = x + norm_a(attn(x))``, ``out = h + norm_m(mlp(h))``. The q/k norms are RMSNorms over the full q and
k width (all heads together, ``qk_norm_scope="full"``), before the split into heads.

Example:
    >>> OLMO2_LAYER.input_norm is None, OLMO2_LAYER.attention.qk_norm_scope.value
    (True, 'full')
"""

from policyinject import hookimpl
from policyinject.policy import NormSpec

from ._llama_like import llama_like_policies

OLMO2_LAYER, OLMO2_CAUSAL_LM, OLMO2_MODEL = llama_like_policies(
    "transformers.models.olmo2.modeling_olmo2.", "Olmo2", q_norm="q_norm", k_norm="k_norm", qk_norm_scope="full",
    layer=dict(norms=(NormSpec("post_attention_layernorm", "rms"), NormSpec("post_feedforward_layernorm", "rms")),
               input_norm=None, post_attention_norm=None, attention_output_norm="post_attention_layernorm",
               mlp_output_norm="post_feedforward_layernorm"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (OLMO2_LAYER, OLMO2_CAUSAL_LM, OLMO2_MODEL):
        register(policy)
