"""Built-in policy: StarCoder2 (``Starcoder2DecoderLayer``, ``Starcoder2ForCausalLM``, ``Starcoder2Model``).

Llama's attention (with biases) and rotary; LayerNorms (with bias); a plain GELU-tanh MLP ``c_fc``/``c_proj``;
sliding-window attention when the config sets ``sliding_window``.

Example:
    >>> STARCODER2_LAYER.mlp.fc1, STARCODER2_LAYER.norms[0].kind.value
    ('c_fc', 'layer')
"""

from policyinject import hookimpl
from policyinject.policy import MLPSpec, NormSpec

from ._llama_like import llama_like_policies

STARCODER2_LAYER, STARCODER2_CAUSAL_LM, STARCODER2_MODEL = llama_like_policies(
    "transformers.models.starcoder2.modeling_starcoder2.", "Starcoder2",
    layer=dict(mlp=MLPSpec(module="mlp", fc1="c_fc", fc2="c_proj", activation="gelu_tanh"),
               norms=(NormSpec("input_layernorm", "layer"), NormSpec("post_attention_layernorm", "layer"))))


@hookimpl
def policyinject_register_policies(register):
    for policy in (STARCODER2_LAYER, STARCODER2_CAUSAL_LM, STARCODER2_MODEL):
        register(policy)
