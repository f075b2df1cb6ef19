"""The mixture-of-experts role of a layer: router, routed experts, optional shared expert -- declared once.

A :class:`MoESpec` says where a sparse MoE block sits in a layer and what it computes, in enough detail that
:class:`policyinject.modules.moe.InjectedMoE` reproduces the Hugging Face block exactly:

- :class:`RouterSpec`: the router's weight (and optional bias), ``top_k`` and the expert count (literals or
  model-config attributes), where the softmax sits (before top-k over all experts, as Mixtral/Qwen/OLMoE, or
  after top-k over the selected logits, as GPT-OSS), whether the top-k weights are renormalised to sum to 1
  (a literal or a config attribute such as ``norm_topk_prob``), and the dtype the weights are applied in;
- :class:`ExpertsSpec`: the experts as fused 3-D parameters (transformers 5: ``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]``; or transposed ``[E, H, 2I]``/``[E, I, H]`` as GPT-OSS) or a ``ModuleList`` of
  per-expert linears; gated or not; gate|up concatenated (``blocks``) or interleaved; biases; activation;
- ``shared`` (an :class:`~policyinject.policy.MLPSpec`, paths relative to the MoE block) and ``shared_gate``
  (a linear ``H -> 1`` whose sigmoid scales the shared expert's output, Qwen2-MoE).

Example:
    >>> spec = MoESpec(
    ...     block="transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock", module="mlp",
    ...     router=RouterSpec(module="gate", top_k="num_experts_per_tok", num_experts="num_local_experts",
    ...                       normalize=True, weights_dtype="float32"),
    ...     experts=ExpertsSpec(module="experts"))
    >>> class Cfg: num_experts_per_tok = 2; num_local_experts = 8
    >>> spec.router.resolve(Cfg())
    ResolvedRouter(top_k=2, num_experts=8, normalize=True)
    >>> spec.block_name, spec.experts.gated
    ('MixtralSparseMoeBlock', True)
"""

from __future__ import annotations

import enum
from typing import Any, Optional, Union

import attrs

from ..errors import PolicyError
from .model import MLPSpec, SizeSource, read_size

__all__ = [
    "ExpertsLayout", "ExpertsSpec", "GateUpOrder", "MoEActivation", "MoESpec", "ResolvedRouter", "RouterSpec",
    "ScoreOrder",
]

#: A boolean read from the model config: a literal, or the attribute name (e.g. ``"norm_topk_prob"``).
FlagSource = Union[bool, str]


class ScoreOrder(str, enum.Enum):
    """Where the softmax sits relative to the top-k selection."""

    #: ``topk(softmax(logits))`` -- Mixtral, Qwen2/3-MoE, OLMoE.
    SOFTMAX_TOPK = "softmax_topk"
    #: ``softmax(topk(logits))`` -- GPT-OSS (the selected logits alone are normalised).
    TOPK_SOFTMAX = "topk_softmax"


class ExpertsLayout(str, enum.Enum):
    #: 3-D parameters on one module: ``gate_up [E, 2I, H]`` (or ``up [E, I, H]``) and ``down [E, H, I]``.
    FUSED = "fused"
    #: ``[E, H, 2I]`` and ``[E, I, H]`` (``x @ W``), GPT-OSS.
    FUSED_TRANSPOSED = "fused_transposed"
    #: A ``ModuleList`` of per-expert modules holding linears (``w1``/``w3``/``w2`` or ``gate_proj``...).
    MODULE_LIST = "module_list"


class GateUpOrder(str, enum.Enum):
    #: ``[gate rows | up rows]`` -- transformers' Mixtral/Qwen/OLMoE ``gate_up_proj``.
    BLOCKS = "blocks"
    #: ``[g0, u0, g1, u1, ...]`` -- GPT-OSS.
    INTERLEAVED = "interleaved"


class MoEActivation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"
    #: GPT-OSS: ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)``,
    #: ``(up + 1) * gate * sigmoid(alpha * gate)``.
    SWIGLU_CLAMPED = "swiglu_clamped"


def _read_flag(config: Any, source: FlagSource, what: str) -> bool:
    if isinstance(source, bool):
        return source
    if config is None or not hasattr(config, source):
        raise PolicyError(f"{what}: the model config has no attribute {source!r}")
    return bool(getattr(config, source))


def _read_required(config: Any, source: SizeSource, what: str) -> int:
    if isinstance(source, int) and not isinstance(source, bool):
        return int(source)
    value = read_size(config, source, what)
    if value is None:
        raise PolicyError(f"{what}: the model config has none of {source!r}")
    return value


@attrs.frozen
class ResolvedRouter:
    """A router's sizes and switches read against one model config."""

    top_k: int
    num_experts: int
    normalize: bool


@attrs.frozen
class RouterSpec:
    """The router: ``logits = x @ weight.T (+ bias)`` on the module at ``module`` (relative to the MoE block)."""

    module: str = "gate"
    #: Attribute names of the router's weight ``[E, H]`` and bias ``[E]`` on that module (an ``nn.Linear``
    #: or HF's ``*TopKRouter``). ``bias=None``: the router has no bias (a non-None bias there is an error).
    weight: str = "weight"
    bias: Optional[str] = None
    #: An int, a config attribute (or tuple of candidates), or a callable ``config -> int``.
    top_k: Any = "num_experts_per_tok"
    num_experts: Any = ("num_experts", "num_local_experts")
    order: ScoreOrder = attrs.field(default=ScoreOrder.SOFTMAX_TOPK, converter=ScoreOrder)
    #: Renormalise the top-k weights to sum to 1 (SOFTMAX_TOPK only): a literal or a config attribute.
    normalize: FlagSource = False
    #: Dtype the routing weights multiply the expert outputs in: ``"float32"`` (Mixtral keeps the fp32
    #: softmax) or ``"input"`` (Qwen/OLMoE/GPT-OSS cast them to the hidden states' dtype).
    weights_dtype: str = attrs.field(default="input", validator=attrs.validators.in_(("float32", "input")))

    def resolve(self, model_config: Any) -> ResolvedRouter:
        """Read ``top_k``, ``num_experts`` and ``normalize`` from a model config (PolicyError if absent)."""
        top_k = _read_required(model_config, self.top_k, "RouterSpec.top_k")
        experts = _read_required(model_config, self.num_experts, "RouterSpec.num_experts")
        if not 1 <= top_k <= experts:
            raise PolicyError(f"RouterSpec: top_k {top_k} must be between 1 and num_experts {experts}")
        normalize = _read_flag(model_config, self.normalize, "RouterSpec.normalize")
        if normalize and self.order is ScoreOrder.TOPK_SOFTMAX:
            normalize = False  # the softmax over the selected logits already sums to 1
        return ResolvedRouter(top_k=top_k, num_experts=experts, normalize=normalize)


@attrs.frozen
class ExpertsSpec:
    """The routed experts, on the module at ``module`` (relative to the MoE block)."""

    module: str = "experts"
    layout: ExpertsLayout = attrs.field(default=ExpertsLayout.FUSED, converter=ExpertsLayout)
    #: FUSED / FUSED_TRANSPOSED: parameter names. A gated expert has ``gate_up``; a plain one ``up`` only.
    gate_up: Optional[str] = "gate_up_proj"
    up: Optional[str] = None
    down: str = "down_proj"
    gate_up_bias: Optional[str] = None
    down_bias: Optional[str] = None
    order: GateUpOrder = attrs.field(default=GateUpOrder.BLOCKS, converter=GateUpOrder)
    #: MODULE_LIST: linear names inside each expert (``gate``/``up``/``down`` for gated, ``up``/``down`` plain;
    #: ``down`` above is reused).
    gate: Optional[str] = None
    activation: MoEActivation = attrs.field(default=MoEActivation.SILU, converter=MoEActivation)
    #: SWIGLU_CLAMPED parameters: a float literal or an attribute of the experts module / model config.
    alpha: Any = None
    limit: Any = None

    def __attrs_post_init__(self) -> None:
        if self.layout is ExpertsLayout.MODULE_LIST:
            if self.up is None:
                raise PolicyError("ExpertsSpec(layout='module_list') needs up (and gate when gated) linear names")
            return
        if (self.gate_up is None) == (self.up is None):
            raise PolicyError("ExpertsSpec with fused parameters takes gate_up (gated) or up (plain), not both")
        if self.activation is MoEActivation.SWIGLU_CLAMPED and (self.alpha is None or self.limit is None):
            raise PolicyError("ExpertsSpec activation 'swiglu_clamped' needs alpha and limit")

    @property
    def gated(self) -> bool:
        if self.layout is ExpertsLayout.MODULE_LIST:
            return self.gate is not None
        return self.gate_up is not None


@attrs.frozen
class MoESpec:
    """A sparse MoE block: ``out = sum_k w_k * expert_{i_k}(x) [+ sigmoid(shared_gate(x)) * shared(x)]``.

    ``block`` is the MoE block's class (object or qualified name): only a submodule at ``module`` of that class
    is an MoE block (Qwen2-MoE keeps dense MLPs in ``mlp_only_layers``; those are left to the MLP role).
    ``returns_router_scores``: the block returns ``(hidden, router_scores)`` (GPT-OSS ``GptOssMLP``).
    """

    block: Union[type, str]
    router: RouterSpec
    experts: ExpertsSpec
    module: str = "mlp"
    shared: Optional[MLPSpec] = None
    shared_gate: Optional[str] = None
    returns_router_scores: bool = False

    def __attrs_post_init__(self) -> None:
        if self.shared_gate is not None and self.shared is None:
            raise PolicyError("MoESpec.shared_gate needs a shared expert (MoESpec.shared)")

    @property
    def block_name(self) -> str:
        if isinstance(self.block, str):
            return self.block.rsplit(".", 1)[-1]
        return self.block.__name__

    def matches(self, module: Any) -> bool:
        """True when ``module`` (the layer's submodule at ``self.module``) is an instance of ``block``."""
        cls = type(module)
        if not isinstance(self.block, str):
            return isinstance(module, self.block)
        return f"{cls.__module__}.{cls.__qualname__}" == self.block
