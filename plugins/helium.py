"""Built-in policy: Helium (``HeliumDecoderLayer``, ``HeliumForCausalLM``, ``HeliumModel``).

Llama wiring with **interleaved** rotary (pairs of adjacent dims) computed from rotate-half tables: the model's ``rotary_emb`` returns ``[f, f]`` tables and the attention re-lays out their first half (``rotary_tables="half"``).

Example:
    >>> HELIUM_LAYER.attention.rotary, HELIUM_LAYER.attention.rotary_tables
    ('interleaved', 'half')
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

HELIUM_LAYER, HELIUM_CAUSAL_LM, HELIUM_MODEL = llama_like_policies(
    "transformers.models.helium.modeling_helium.", "Helium", rotary="interleaved", rotary_tables="half")


@hookimpl
def policyinject_register_policies(register):
    for policy in (HELIUM_LAYER, HELIUM_CAUSAL_LM, HELIUM_MODEL):
        register(policy)
