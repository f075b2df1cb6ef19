"""Built-in policy: Seed-OSS (``SeedOssDecoderLayer``, ``SeedOssForCausalLM``, ``SeedOssModel``).

Llama wiring (pre-norm RMSNorm block, separate q/k/v/o, gated SiLU MLP, rotate-half rotary). q/k/v carry biases (``attention_bias``), kept by the fused QKV.

Example:
    >>> SEED_OSS_LAYER.layer_name
    'SeedOssDecoderLayer'
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

SEED_OSS_LAYER, SEED_OSS_CAUSAL_LM, SEED_OSS_MODEL = llama_like_policies("transformers.models.seed_oss.modeling_seed_oss.", "SeedOss")


@hookimpl
def policyinject_register_policies(register):
    for policy in (SEED_OSS_LAYER, SEED_OSS_CAUSAL_LM, SEED_OSS_MODEL):
        register(policy)
