"""Policies (data only): Qwen2-MoE and Qwen3-MoE layers, models and their MoE blocks.

Both: Llama-style attention (Qwen2-MoE with q/k/v biases, Qwen3-MoE with per-head ``q_norm``/``k_norm``),
RMSNorms, and an ``mlp`` that is a sparse MoE block (``Qwen2MoeSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``)
or, in ``mlp_only_layers`` and layers off ``decoder_sparse_step``, a dense MLP. The pre-norm layer policies
name both: ``moe`` where ``mlp`` is the MoE class, the dense ``mlp`` role elsewhere.

Routing (transformers 5.24): softmax over all experts in float32, top-k (``num_experts_per_tok``), the k
weights renormalised when ``norm_topk_prob``, then cast to the hidden states' dtype. Qwen2-MoE adds a shared
expert (``shared_expert``, a gated MLP) scaled by ``sigmoid(shared_expert_gate(x))``.

Example:
    >>> QWEN2_MOE.shared_gate, QWEN3_MOE.shared is None
    ('shared_expert_gate', True)
"""

from policyinject import hookimpl
from policyinject.policy import AttentionSpec, MLPSpec, ModelPolicy, NormSpec, Policy
from policyinject.policy.moe import ExpertsSpec, MoESpec, RouterSpec

_Q2 = "transformers.models.qwen2_moe.modeling_qwen2_moe."
_Q3 = "transformers.models.qwen3_moe.modeling_qwen3_moe."

_ROUTER = RouterSpec(module="gate", top_k="num_experts_per_tok", num_experts="num_experts", order="softmax_topk",
                     normalize="norm_topk_prob", weights_dtype="input")
_EXPERTS = ExpertsSpec(module="experts", gate_up="gate_up_proj", down="down_proj", activation="silu")

QWEN2_MOE = MoESpec(
    block=_Q2 + "Qwen2MoeSparseMoeBlock", module="mlp", router=_ROUTER, experts=_EXPERTS,
    shared=MLPSpec(module="shared_expert", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    shared_gate="shared_expert_gate",
)
QWEN3_MOE = MoESpec(block=_Q3 + "Qwen3MoeSparseMoeBlock", module="mlp", router=_ROUTER, experts=_EXPERTS)


def _layer(module: str, prefix: str, moe: MoESpec, **attention_extra) -> Policy:
    return Policy(
        layer=f"{module}{prefix}DecoderLayer",
        attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                                tp_attributes={"num_key_value_groups": "kv_groups"}, **attention_extra),
        norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
        block="pre_norm",
        mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
        moe=moe,
        input_norm="input_layernorm",
        post_attention_norm="post_attention_layernorm",
    )


def _models(module: str, prefix: str) -> tuple:
    return (ModelPolicy(model=f"{module}{prefix}ForCausalLM", layers="model.layers", embed="model.embed_tokens",
                        final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head", rotary_emb="model.rotary_emb"),
            ModelPolicy(model=f"{module}{prefix}Model", layers="layers", embed="embed_tokens",
                        final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb"))


QWEN2_MOE_LAYER = _layer(_Q2, "Qwen2Moe", QWEN2_MOE)
QWEN3_MOE_LAYER = _layer(_Q3, "Qwen3Moe", QWEN3_MOE, q_norm="q_norm", k_norm="k_norm")
QWEN2_MOE_CAUSAL_LM, QWEN2_MOE_MODEL = _models(_Q2, "Qwen2Moe")
QWEN3_MOE_CAUSAL_LM, QWEN3_MOE_MODEL = _models(_Q3, "Qwen3Moe")


@hookimpl
def policyinject_register_policies(register):
    for policy in (QWEN2_MOE_LAYER, QWEN2_MOE_CAUSAL_LM, QWEN2_MOE_MODEL,
                   QWEN3_MOE_LAYER, QWEN3_MOE_CAUSAL_LM, QWEN3_MOE_MODEL):
        register(policy)
