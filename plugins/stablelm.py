"""Built-in policy: StableLM (``StableLmDecoderLayer``, ``StableLmForCausalLM``, ``StableLmModel``).

Llama wiring with LayerNorms (with bias) and partial rotary (``partial_rotary_factor``; the model's tables
cover the rotated dims only). The default sequential residual is described; a config with
``use_parallel_residual=True`` has no ``post_attention_layernorm`` and planning refuses it, naming the norm.
Configs with ``qk_layernorm=True`` add per-head LayerNorm lists this policy does not name: those layers are
injected submodule by submodule (the layer's own forward kept) and ``engine.generate`` uses Hugging Face's.

Example:
    >>> STABLELM_LAYER.norms[0].kind.value
    'layer'
"""

from policyinject import hookimpl
from policyinject.policy import NormSpec

from ._llama_like import llama_like_policies

STABLELM_LAYER, STABLELM_CAUSAL_LM, STABLELM_MODEL = llama_like_policies(
    "transformers.models.stablelm.modeling_stablelm.", "StableLm",
    layer=dict(norms=(NormSpec("input_layernorm", "layer"), NormSpec("post_attention_layernorm", "layer"))))


@hookimpl
def policyinject_register_policies(register):
    for policy in (STABLELM_LAYER, STABLELM_CAUSAL_LM, STABLELM_MODEL):
        register(policy)
