"""Policies (data only): OLMoE and GPT-OSS MoE blocks, and OLMoE's layer and models.

OLMoE (transformers 5.24): a pre-norm layer whose attention has RMSNorms over the whole q and k projections
(``qk_norm_scope="full"``) and whose MLP slot is the MoE block. OLMoE clamps q/k/v (``clip_qkv``) *after* the
q/k norms, the injected attention before them: a model with ``clip_qkv`` set is refused when the attention is
built. Routing as Qwen-MoE: softmax in float32, top-k, renormalised when ``norm_topk_prob``, weights cast to
the input dtype.

GPT-OSS (``GptOssMLP``): the router has a bias; ``softmax(topk(logits))``; experts stored transposed
(``gate_up_proj [E, H, 2I]`` with gate and up interleaved, ``down_proj [E, I, H]``) with biases; clamped
SwiGLU (``alpha``, ``limit`` read from the experts module); the block returns ``(hidden, router_scores)``.

GPT-OSS has no layer policy (its attention sinks are outside the attention vocabulary): ``GPT_OSS_MOE``
serves :func:`policyinject.modules.moe.inject_moe`.

Example:
    >>> OLMOE_MOE.router.normalize, GPT_OSS_MOE.router.order.value
    ('norm_topk_prob', 'topk_softmax')
"""

from policyinject import hookimpl
from policyinject.errors import PolicyError
from policyinject.policy import AttentionSpec, ModelPolicy, NormSpec, Policy
from policyinject.policy.moe import ExpertsSpec, MoESpec, RouterSpec

_O = "transformers.models.olmoe.modeling_olmoe."
_G = "transformers.models.gpt_oss.modeling_gpt_oss."

OLMOE_MOE = MoESpec(
    block=_O + "OlmoeSparseMoeBlock", module="mlp",
    router=RouterSpec(module="gate", top_k="num_experts_per_tok", num_experts="num_experts",
                      normalize="norm_topk_prob", weights_dtype="input"),
    experts=ExpertsSpec(module="experts", gate_up="gate_up_proj", down="down_proj", activation="silu"),
)

GPT_OSS_MOE = MoESpec(
    block=_G + "GptOssMLP", module="mlp",
    router=RouterSpec(module="router", bias="bias", top_k="num_experts_per_tok", num_experts="num_local_experts",
                      order="topk_softmax", weights_dtype="input"),
    experts=ExpertsSpec(module="experts", layout="fused_transposed", gate_up="gate_up_proj", down="down_proj",
                        gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias", order="interleaved",
                        activation="swiglu_clamped", alpha="alpha", limit="limit"),
    returns_router_scores=True,
)

def _no_clip(config):
    if getattr(config, "clip_qkv", None) is not None:
        raise PolicyError("OLMoE clamps q/k/v after its q/k norms (clip_qkv); the injected attention clamps "
                          "before them: a model with clip_qkv set is not supported")
    return None


OLMOE_LAYER = Policy(
    layer=_O + "OlmoeDecoderLayer",
    attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj", rotary="half",
                            q_norm="q_norm", k_norm="k_norm", qk_norm_scope="full", clip_qkv=_no_clip,
                            tp_attributes={"num_key_value_groups": "kv_groups"}),
    norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    block="pre_norm",
    moe=OLMOE_MOE,
    input_norm="input_layernorm",
    post_attention_norm="post_attention_layernorm",
)
OLMOE_MODEL = ModelPolicy(model=_O + "OlmoeModel", layers="layers", embed="embed_tokens",
                          final_norm=NormSpec("norm", "rms"), rotary_emb="rotary_emb")
OLMOE_CAUSAL_LM = ModelPolicy(model=_O + "OlmoeForCausalLM", layers="model.layers", embed="model.embed_tokens",
                              final_norm=NormSpec("model.norm", "rms"), lm_head="lm_head",
                              rotary_emb="model.rotary_emb")


@hookimpl
def policyinject_register_policies(register):
    for policy in (OLMOE_LAYER, OLMOE_CAUSAL_LM, OLMOE_MODEL):
        register(policy)
