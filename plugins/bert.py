"""Built-in policy: BERT (``BertLayer``; ``BertModel``, ``BertForMaskedLM``), an encoder.

Post-norm block: ``h = LN1(x + attn(x)); out = LN2(h + mlp(h))``, LN1 at ``attention.output.LayerNorm`` and
LN2 at ``output.LayerNorm`` (both residual adds are fused into them). Bidirectional attention (no causal
mask; padding comes in the mask); learned absolute positions; plain exact-GELU MLP whose two linears live in
different submodules (``intermediate.dense``, ``output.dense``). Layers with cross-attention are injected
submodule by submodule.

Example:
    >>> BERT_LAYER.block.value, BERT_LAYER.attention.causal
    ('post_norm', False)
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy

_M = "transformers.models.bert.modeling_bert."

BERT_LAYER = Policy(
    layer=_M + "BertLayer",
    attention=AttentionSpec(module="attention", q="self.query", k="self.key", v="self.value", o="output.dense",
                            causal=False, num_kv_heads=("num_attention_heads",),
                            tp_attributes={"self.num_attention_heads": "heads", "self.all_head_size": "hidden"}),
    mlp=MLPSpec(module="", fc1="intermediate.dense", fc2="output.dense", activation="gelu"),
    norms=(NormSpec("attention.output.LayerNorm", "layer"), NormSpec("output.LayerNorm", "layer")),
    block="post_norm",
    input_norm="attention.output.LayerNorm",
    post_attention_norm="output.LayerNorm",
)

BERT_MODEL = ModelPolicy(model=_M + "BertModel", layers="encoder.layer", embed="embeddings.word_embeddings",
                         position_embed="embeddings.position_embeddings")
BERT_MASKED_LM = ModelPolicy(model=_M + "BertForMaskedLM", layers="bert.encoder.layer",
                             embed="bert.embeddings.word_embeddings",
                             position_embed="bert.embeddings.position_embeddings", lm_head="cls.predictions.decoder")


@hookimpl
def policyinject_register_policies(register):
    for policy in (BERT_LAYER, BERT_MODEL, BERT_MASKED_LM):
        register(policy)
