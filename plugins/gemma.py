"""Built-in policy: Gemma (``GemmaDecoderLayer``, ``GemmaForCausalLM``, ``GemmaModel``).

Llama wiring with two differences:

- **GemmaRMSNorm scales by ``(1 + weight)``**, not ``weight`` (its weights are stored zero-centred), and
  multiplies in float32 before casting back. Every norm spec here sets ``weight_offset=1.0``; the fused
  kernel computes ``x / rms(x) * (1 + w)`` in float32. Its epsilon attribute is ``eps``.
- The MLP activation is tanh-approximated GELU (``gelu_pytorch_tanh``), gated (GeGLU).

The model scales the embeddings by ``sqrt(hidden_size)`` itself; that stays in the model's own forward.

Example:
    >>> {n.path: n.weight_offset for n in GEMMA_LAYER.norms}
    {'input_layernorm': 1.0, 'post_attention_layernorm': 1.0}
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.gemma.modeling_gemma."


def _norm(path: str) -> NormSpec:
    return NormSpec(path, "rms", eps_attr=("eps",), weight_offset=1.0)


GEMMA_LAYER = Policy(
    layer=_M + "GemmaDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu_tanh"),
    norms=(_norm("input_layernorm"), _norm("post_attention_layernorm")),
    block="pre_norm",
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)

GEMMA_CAUSAL_LM = ModelPolicy(model=_M + "GemmaForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=_norm("model.norm"), lm_head="lm_head", rotary_emb="model.rotary_emb")
GEMMA_MODEL = ModelPolicy(model=_M + "GemmaModel", layers="layers", embed="embed_tokens",
                          final_norm=_norm("norm"), rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (GEMMA_LAYER, GEMMA_CAUSAL_LM, GEMMA_MODEL):
        register(policy)
