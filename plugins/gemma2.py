"""Built-in policy: Gemma-2 (``Gemma2DecoderLayer``, ``Gemma2ForCausalLM``, ``Gemma2Model``).

Gemma's norms (``(1 + weight)`` RMSNorm) and GeGLU MLP, plus:

- **sandwich norms**: ``post_attention_layernorm`` on the attention output and ``post_feedforward_layernorm``
  on the MLP output before each residual add (``attention_output_norm``/``mlp_output_norm``); the norm
  before the MLP is ``pre_feedforward_layernorm``;
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` (``AttentionSpec.scale``) and soft-capped
  by ``attn_logit_softcapping``; the final logits soft-capped by ``final_logit_softcapping``;
- sliding-window attention on alternate layers (the config's ``layer_types``).

Example:
    >>> GEMMA2_LAYER.attention_output_norm, GEMMA2_LAYER.post_attention_norm
    ('post_attention_layernorm', 'pre_feedforward_layernorm')
"""

from policyinject import hookimpl
from policyinject.policy import NormSpec

from ._llama_like import llama_like_policies


def _norm(path: str) -> NormSpec:
    return NormSpec(path, "rms", eps_attr=("eps",), weight_offset=1.0)


def query_scale(config) -> float:
    """``query_pre_attn_scalar ** -0.5``."""
    return float(config.query_pre_attn_scalar) ** -0.5


#: The Gemma-2/3 layer wiring (sandwich norms), shared with the Gemma-3 plugin.
SANDWICH = dict(
    mlp=None,  # filled below
    norms=(_norm("input_layernorm"), _norm("post_attention_layernorm"), _norm("pre_feedforward_layernorm"),
           _norm("post_feedforward_layernorm")),
    input_norm="input_layernorm",
    post_attention_norm="pre_feedforward_layernorm",
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
)


def _mlp():
    from policyinject.policy import MLPSpec

    return MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu_tanh")


SANDWICH["mlp"] = _mlp()

GEMMA2_LAYER, GEMMA2_CAUSAL_LM, GEMMA2_MODEL = llama_like_policies(
    "transformers.models.gemma2.modeling_gemma2.", "Gemma2", scale=query_scale,
    logit_softcap="attn_logit_softcapping", layer=SANDWICH,
    model=dict(final_logit_softcap="final_logit_softcapping"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GEMMA2_LAYER, GEMMA2_CAUSAL_LM, GEMMA2_MODEL):
        register(policy)
