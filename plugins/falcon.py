"""Built-in policy: Falcon (``FalconDecoderLayer``, ``FalconForCausalLM``, ``FalconModel``).

Falcon's wiring depends on its config, so this plugin registers one policy per variant and picks among them
with the ``policyinject_select_policy`` hook, from the layer's ``config``:

============================  =======================================  ==================  ===========
variant (config)              fused ``query_key_value`` rows            KV heads            block
============================  =======================================  ==================  ===========
multi-query (Falcon-7B;       ``[q (H*d) | k (d) | v (d)]``: blocks     1                   parallel, one
default)                                                                                    LayerNorm
new decoder architecture      per KV group ``[q_g.. | k_g | v_g]``      ``num_kv_heads``    parallel,
(Falcon-40B/180B)                                                                           ``ln_attn``/``ln_mlp``
multi-head                    per head ``[q_h | k_h | v_h]``            ``num_heads``       parallel
``parallel_attn=False``       as above                                  as above            pre-norm
============================  =======================================  ==================  ===========

All linears are ``FalconLinear`` (an ``nn.Linear`` subclass); the MLP is plain exact GELU. ALiBi variants
(``alibi=True``) carry the bias inside the attention mask: each wiring has a twin without rotary, chosen from
the config (:data:`ALIBI_VARIANTS`).
The HF attention counts heads with ``num_heads``/``num_kv_heads`` (tensor-parallel attributes).

Example:
    >>> class C: new_decoder_architecture = False; multi_query = True; parallel_attn = True
    >>> variant_for(C()).attention.qkv_layout.value
    'blocks'
    >>> C.alibi = True
    >>> variant_for(C()).attention.rotary is None
    True
"""

from typing import Any

import attrs

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.falcon.modeling_falcon."
_LAYER = _M + "FalconDecoderLayer"


def kv_heads(config: Any) -> int:
    """KV heads of a Falcon config: ``num_kv_heads`` for the new architecture, 1 for multi-query, else all."""
    if getattr(config, "new_decoder_architecture", False):
        return int(config.num_kv_heads)
    if getattr(config, "multi_query", True):
        return 1
    return int(config.num_attention_heads)


def _attention(layout: str, rotary: Any = "half") -> AttentionSpec:
    return AttentionSpec(module="self_attention", qkv="query_key_value", qkv_layout=layout, o="dense",
                         rotary=rotary, num_heads=("num_attention_heads",), num_kv_heads=kv_heads,
                         tp_attributes={"num_heads": "heads", "num_kv_heads": "kv_heads"})


_MLP = MLPSpec(module="mlp", fc1="dense_h_to_4h", fc2="dense_4h_to_h", activation="gelu")


def _ln(path: str) -> NormSpec:
    return NormSpec(path, "layer", eps_attr=("eps",))


FALCON_MULTI_QUERY = Policy(layer=_LAYER, attention=_attention("blocks"), mlp=_MLP, norms=(_ln("input_layernorm"),),
                            block="parallel", input_norm="input_layernorm")
FALCON_NEW_ARCH = Policy(layer=_LAYER, attention=_attention("per_kv_group"), mlp=_MLP,
                         norms=(_ln("ln_attn"), _ln("ln_mlp")), block="parallel",
                         input_norm="ln_attn", post_attention_norm="ln_mlp")
FALCON_NEW_ARCH_ONE_LN = Policy(layer=_LAYER, attention=_attention("per_kv_group"), mlp=_MLP,
                                norms=(_ln("input_layernorm"),), block="parallel", input_norm="input_layernorm")
FALCON_MULTI_HEAD = Policy(layer=_LAYER, attention=_attention("per_head"), mlp=_MLP,
                           norms=(_ln("input_layernorm"),), block="parallel", input_norm="input_layernorm")
FALCON_SEQUENTIAL_MQ = Policy(layer=_LAYER, attention=_attention("blocks"), mlp=_MLP,
                              norms=(_ln("input_layernorm"), _ln("post_attention_layernorm")), block="pre_norm",
                              input_norm="input_layernorm", post_attention_norm="post_attention_layernorm")
FALCON_SEQUENTIAL_MH = Policy(layer=_LAYER, attention=_attention("per_head"), mlp=_MLP,
                              norms=(_ln("input_layernorm"), _ln("post_attention_layernorm")), block="pre_norm",
                              input_norm="input_layernorm", post_attention_norm="post_attention_layernorm")

#: The rotary variants; the first is the default when no config tells otherwise.
ROTARY_VARIANTS = (FALCON_MULTI_QUERY, FALCON_NEW_ARCH, FALCON_NEW_ARCH_ONE_LN, FALCON_MULTI_HEAD,
                   FALCON_SEQUENTIAL_MQ, FALCON_SEQUENTIAL_MH)
#: The same wiring without rotary, for ``alibi=True`` configs: their ALiBi bias arrives inside the attention
#: mask. Which one applies is read from the config, never from the call (transformers 5.25 stopped passing
#: ``alibi=`` to the layer and computes rotary tables for ALiBi models too).
ALIBI_VARIANTS = tuple(attrs.evolve(p, attention=attrs.evolve(p.attention, rotary=None)) for p in ROTARY_VARIANTS)
#: Every variant.
VARIANTS = ROTARY_VARIANTS + ALIBI_VARIANTS


def variant_for(config: Any) -> Policy:
    """The policy variant matching a Falcon config."""
    if getattr(config, "new_decoder_architecture", False):
        two = getattr(config, "num_ln_in_parallel_attn", None) in (None, 2)
        policy = FALCON_NEW_ARCH if two else FALCON_NEW_ARCH_ONE_LN
    else:
        multi_query = getattr(config, "multi_query", True)
        if getattr(config, "parallel_attn", True):
            policy = FALCON_MULTI_QUERY if multi_query else FALCON_MULTI_HEAD
        else:
            policy = FALCON_SEQUENTIAL_MQ if multi_query else FALCON_SEQUENTIAL_MH
    if getattr(config, "alibi", False) is True:
        return ALIBI_VARIANTS[ROTARY_VARIANTS.index(policy)]
    return policy


FALCON_CAUSAL_LM = ModelPolicy(model=_M + "FalconForCausalLM", layers="transformer.h",
                               embed="transformer.word_embeddings", final_norm=_ln("transformer.ln_f"),
                               lm_head="lm_head", rotary_emb="transformer.rotary_emb")
FALCON_MODEL = ModelPolicy(model=_M + "FalconModel", layers="h", embed="word_embeddings", final_norm=_ln("ln_f"),
                           rotary_emb="rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in VARIANTS + (FALCON_CAUSAL_LM, FALCON_MODEL):
        register(policy)


@hookimpl
def policyinject_select_policy(module, path, candidates):
    """Pick the Falcon variant for a ``FalconDecoderLayer`` from its ``config``; None for anything else."""
    config = getattr(module, "config", None)
    if config is None or type(module).__name__ != "FalconDecoderLayer":
        return None
    wanted = variant_for(config)
    for candidate in candidates:
        if candidate.attention == wanted.attention and candidate.norms == wanted.norms and candidate.block == wanted.block:
            return candidate
    return None
