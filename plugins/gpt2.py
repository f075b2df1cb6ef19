"""Built-in policy: GPT-2 (``GPT2Block``, ``GPT2LMHeadModel``, ``GPT2Model``).

Pre-norm LayerNorm block with learned absolute positions (``transformer.wpe``, no rotary). Every projection
is a ``transformers.pytorch_utils.Conv1D`` whose **weight is stored ``[in, out]``** (the transpose of
``nn.Linear``), listed in ``transposed``; kernel injection turns each into an ``nn.Linear`` once. The QKV
projection ``attn.c_attn`` is fused with rows ``[q | k | v]`` (``blocks``). The HF attention splits its
output with ``split_size`` and counts heads with ``num_heads`` (tensor-parallel attributes). Blocks built with
cross-attention (``add_cross_attention``) are injected submodule by submodule.

Example:
    >>> GPT2_LAYER.transposed
    ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.gpt2.modeling_gpt2."

GPT2_LAYER = Policy(
    layer=_M + "GPT2Block",
    attention=AttentionSpec(module="attn", qkv="c_attn", qkv_layout="blocks", o="c_proj",
                            num_kv_heads=("num_attention_heads", "n_head"),
                            tp_attributes={"num_heads": "heads", "split_size": "hidden"}),
    mlp=MLPSpec(module="mlp", fc1="c_fc", fc2="c_proj", activation="gelu_tanh"),
    norms=(NormSpec("ln_1", "layer"), NormSpec("ln_2", "layer")),
    block="pre_norm",
    input_norm="ln_1",
    post_attention_norm="ln_2",
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
)

GPT2_LM_HEAD = ModelPolicy(model=_M + "GPT2LMHeadModel", layers="transformer.h", embed="transformer.wte",
                           position_embed="transformer.wpe", final_norm=NormSpec("transformer.ln_f", "layer"),
                           lm_head="lm_head")
GPT2_MODEL = ModelPolicy(model=_M + "GPT2Model", layers="h", embed="wte", position_embed="wpe",
                         final_norm=NormSpec("ln_f", "layer"))


@hookimpl
def policyinject_register_policies(register):
    for policy in (GPT2_LAYER, GPT2_LM_HEAD, GPT2_MODEL):
        register(policy)
