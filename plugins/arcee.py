"""Built-in policy: Arcee (``ArceeDecoderLayer``, ``ArceeForCausalLM``, ``ArceeModel``).

Llama wiring with a plain (not gated) MLP ``down_proj(relu(up_proj(x)) ** 2)``: activation ``relu2``.

Example:
    >>> ARCEE_LAYER.mlp.fc1, ARCEE_LAYER.mlp.activation.value
    ('up_proj', 'relu2')
"""

from policyinject import hookimpl
from policyinject.policy import MLPSpec

from ._llama_like import llama_like_policies

ARCEE_LAYER, ARCEE_CAUSAL_LM, ARCEE_MODEL = llama_like_policies(
    "transformers.models.arcee.modeling_arcee.", "Arcee",
    layer=dict(mlp=MLPSpec(module="mlp", fc1="up_proj", fc2="down_proj", activation="relu2")))


@hookimpl
def policyinject_register_policies(register):
    for policy in (ARCEE_LAYER, ARCEE_CAUSAL_LM, ARCEE_MODEL):
        register(policy)
