"""The plugin module named by this package's ``policyinject`` entry point.

``BareBlock`` has no model config to read head counts from, so its policy reads them from the layer: each
size source is a callable ``(layer, config) -> int`` (``config`` is None for this model). The head size is
left to policyinject, which derives it from the q projection's rows. Nothing here imports torch or the
model module.

Example:
    >>> BARE_BLOCK_POLICY.layer_name, BARE_BLOCK_POLICY.attention.num_heads.__name__
    ('BareBlock', 'attention_heads')
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, BlockKind, MLPSpec, ModelPolicy, NormSpec, Policy


def attention_heads(layer, config):
    """Query heads of one ``BareBlock`` (``config`` is None: the model has none)."""
    return layer.attn.n_heads


def kv_heads(layer, config):
    return layer.attn.n_kv_heads


BARE_BLOCK_POLICY = Policy(
    layer="policyinject_example_bare.modeling.BareBlock",
    attention=AttentionSpec(
        module="attn", q="wq", k="wk", v="wv", o="wo",
        num_heads=attention_heads, num_kv_heads=kv_heads,
        # tensor parallelism rewrites these per rank (the module's forward reshapes with them)
        tp_attributes={"n_heads": "heads", "n_kv_heads": "kv_heads"},
    ),
    mlp=MLPSpec(module="mlp", gate="w1", up="w3", down="w2", activation="silu"),
    norms=(NormSpec("attn_norm", "rms"), NormSpec("ffn_norm", "rms")),
    block=BlockKind.PRE_NORM, input_norm="attn_norm", post_attention_norm="ffn_norm",
)

BARE_MODEL_POLICY = ModelPolicy(
    model="policyinject_example_bare.modeling.BareDecoder",
    layers="blocks", embed="tok", position_embed="pos",
    final_norm=NormSpec("norm", "rms"), lm_head="out",
)


@hookimpl
def policyinject_register_policies(register):
    register(BARE_BLOCK_POLICY)
    register(BARE_MODEL_POLICY)
