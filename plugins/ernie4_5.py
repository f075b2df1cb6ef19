"""Built-in policy: ERNIE-4.5 (``Ernie4_5DecoderLayer``, ``Ernie4_5ForCausalLM``, ``Ernie4_5Model``).

Llama wiring with **interleaved** rotary (pairs of adjacent dims) computed from rotate-half tables: the model's ``rotary_emb`` returns ``[f, f]`` tables and the attention re-lays out their first half (``rotary_tables="half"``).

Example:
    >>> ERNIE4_5_LAYER.attention.rotary, ERNIE4_5_LAYER.attention.rotary_tables
    ('interleaved', 'half')
"""

from policyinject import hookimpl

from ._llama_like import llama_like_policies

ERNIE4_5_LAYER, ERNIE4_5_CAUSAL_LM, ERNIE4_5_MODEL = llama_like_policies(
    "transformers.models.ernie4_5.modeling_ernie4_5.", "Ernie4_5", rotary="interleaved", rotary_tables="half")


@hookimpl
def policyinject_register_policies(register):
    for policy in (ERNIE4_5_LAYER, ERNIE4_5_CAUSAL_LM, ERNIE4_5_MODEL):
        register(policy)
