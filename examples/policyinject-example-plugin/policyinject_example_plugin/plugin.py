"""The plugin module named by this package's ``policyinject`` entry point.

It describes ``ToyBlock`` declaratively and registers the description; it imports neither torch nor the
model module, so discovering plugins stays cheap.

Example:
    >>> TOY_BLOCK_POLICY.layer_name
    'ToyBlock'
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, BlockKind, MLPSpec, ModelPolicy, NormSpec, Policy

TOY_BLOCK_POLICY = Policy(
    layer="policyinject_example_plugin.modeling.ToyBlock",
    attention=AttentionSpec(
        module="attn", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
        num_heads="num_attention_heads", num_kv_heads="num_attention_heads",
        tp_attributes={"num_heads": "heads"},
    ),
    mlp=MLPSpec(module="mlp", fc1="fc1", fc2="fc2", activation="gelu"),
    norms=(NormSpec("ln1", "layer"), NormSpec("ln2", "layer")),
    block=BlockKind.OPAQUE,
)

TOY_MODEL_POLICY = ModelPolicy(
    model="policyinject_example_plugin.modeling.ToyForCausalLM",
    layers="blocks",
    embed="embed",
    position_embed="pos",
    final_norm=NormSpec("ln_f", "layer"),
    lm_head="head",
)


@hookimpl
def policyinject_register_policies(register):
    register(TOY_BLOCK_POLICY)
    register(TOY_MODEL_POLICY)
