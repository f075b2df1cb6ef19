"""The declarative policy data model: what each submodule of a layer class *is*.

A :class:`Policy` describes one layer class (a transformer block): where its attention projections, MLP
projections and norms are, how heads are counted, and how each linear splits under tensor parallelism.
A :class:`ModelPolicy` describes the model around the blocks: embeddings, the layer list, the final norm
and the output head. Every pass (tensor parallel, quantize, kernel injection, the decode engine) derives
its work from these two descriptions; none of them hard-codes an architecture.

All classes are frozen attrs classes: policies are values, safe to share between models and processes.

Example:
    >>> from policyinject.policy import Policy, AttentionSpec, MLPSpec, NormSpec
    >>> p = Policy(
    ...     layer="transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    ...     attention=AttentionSpec(module="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj"),
    ...     mlp=MLPSpec(module="mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"),
    ...     norms=(NormSpec("input_layernorm", "rms"), NormSpec("post_attention_layernorm", "rms")),
    ... )
    >>> p.linear_styles()["self_attn.o_proj"].value
    'row'
    >>> p.layer_name
    'LlamaDecoderLayer'
"""

from __future__ import annotations

import enum
import importlib
from typing import Any, Callable, Mapping, Optional, Union

import attrs

from .._nn import is_conv1d, qualname
from ..errors import PolicyError

from .sizes import SizeSource, ValueSource, _tuple_of_str, read_size, read_value, takes_layer  # noqa: F401


class Style(str, enum.Enum):
    """How one weight splits over tensor-parallel ranks (Megatron vocabulary)."""

    #: Output features split (weight dim 0 of an ``nn.Linear``); bias split with them; no communication.
    COLUMN = "column"
    #: Column split, then an all-gather so the output is replicated (HF ``colwise_gather_output``).
    COLUMN_GATHER = "column_gather"
    #: Input features split (weight dim 1); all-reduce after the matmul; bias added once after the reduce.
    ROW = "row"
    #: Row split whose input arrives replicated and is sliced locally first (HF ``rowwise_split_input``).
    ROW_SPLIT_INPUT = "row_split_input"
    #: The whole weight on every rank.
    REPLICATE = "replicate"
    #: A fused projection (q|k|v, gate|up) whose pieces are split separately and re-packed per rank, so
    #: that every rank holds matching pieces. Its layout is given by the role that names it.
    PACKED_COLUMN = "packed_column"
    #: ``nn.Embedding`` split over the vocabulary; masked lookup then all-reduce.
    VOCAB_EMBEDDING = "vocab_embedding"
    #: Output head split over the vocabulary, then the logits are all-gathered.
    VOCAB_HEAD = "vocab_head"


class QKVLayout(str, enum.Enum):
    """Row order of a fused q/k/v projection's output features."""

    #: ``[q (Hq*d) | k (Hkv*d) | v (Hkv*d)]`` -- GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, Falcon multi-query.
    BLOCKS = "blocks"
    #: Per head ``[q_h | k_h | v_h]`` each of ``d`` rows -- GPT-NeoX / BLOOM ``query_key_value`` (Hq == Hkv).
    PER_HEAD = "per_head"
    #: Per KV group ``[q_g0 .. q_g{n-1} | k_g | v_g]`` -- Falcon ``new_decoder_architecture``.
    PER_KV_GROUP = "per_kv_group"


class Activation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    RELU = "relu"
    #: ``relu(x) ** 2`` (Persimmon, Arcee, Nemotron ``relu2``).
    RELU2 = "relu2"


class QKNormScope(str, enum.Enum):
    """What the q/k norms of an attention normalise over."""

    #: Each head over ``head_dim`` (Qwen3, Gemma-3, Cohere, Persimmon, StableLM).
    HEAD = "head"
    #: All heads together over ``heads x head_dim``, before the split into heads (OLMo-2).
    FULL = "full"


class NormKind(str, enum.Enum):
    RMS = "rms"
    LAYER = "layer"


class BlockKind(str, enum.Enum):
    """How attention, MLP and residuals are wired inside the block."""

    #: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` -- Llama, Mistral, Qwen, GPT-2, NeoX (non-parallel).
    PRE_NORM = "pre_norm"
    #: ``out = x + attn(norm1(x)) + mlp(norm1(x))`` (or norm2 for the MLP) -- Falcon, Phi, GPT-J, NeoX parallel.
    PARALLEL = "parallel"
    #: ``h = norm1(x + attn(x)); out = norm2(h + mlp(h))`` -- BERT.
    POST_NORM = "post_norm"
    #: Anything else: the block's own forward is kept; only its submodules are replaced.
    OPAQUE = "opaque"


@attrs.frozen
class AttentionSpec:
    """The attention role of a layer.

    Paths are relative to the attention module (``module``, itself relative to the layer; ``""`` when the
    projections sit directly on the layer). Give either ``q``/``k``/``v`` or a fused ``qkv`` with its
    ``qkv_layout``.
    """

    module: str = ""
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    qkv_layout: QKVLayout = attrs.field(default=QKVLayout.BLOCKS, converter=QKVLayout)
    o: Optional[str] = None
    #: Where head counts come from in the model config.
    num_heads: SizeSource = ("num_attention_heads", "n_head", "num_heads")
    num_kv_heads: SizeSource = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
    head_dim: SizeSource = ("head_dim",)
    #: Rotary embedding applied to q and k: ``"half"`` (rotate-half, Llama/NeoX), ``"interleaved"`` or None.
    rotary: Optional[str] = None
    #: Layout of the model's rotary tables when it differs from the rotation's: ``"half"`` means the tables
    #: are rotate-half ones (``[f_0 .. f_{R/2-1}, f_0 .. f_{R/2-1}]``) while the rotation is interleaved; the
    #: attention then uses ``cos[..., :R/2].repeat_interleave(2)`` (Helium, GLM, ERNIE-4.5). None: as-is.
    rotary_tables: Optional[str] = None
    #: Fraction of ``head_dim`` that is rotated (NeoX ``rotary_pct``, Phi ``partial_rotary_factor``).
    rotary_fraction: SizeSource = None
    #: Extra norms applied per head on q and k (Qwen3 ``q_norm``/``k_norm``), relative to ``module``.
    q_norm: Optional[str] = None
    k_norm: Optional[str] = None
    #: What ``q_norm``/``k_norm`` normalise over (:class:`QKNormScope`): per head, or the full q/k width.
    qk_norm_scope: QKNormScope = attrs.field(default=QKNormScope.HEAD, converter=QKNormScope)
    #: Layout in which a per-head q/k norm module that is neither ``nn.LayerNorm`` nor an RMSNorm is called:
    #: ``"bhtd"`` (after the heads move to dim 1: StableLM's per-head LayerNorm list) or ``"bthd"`` (before:
    #: Cohere's ``CohereLayerNorm`` with a ``[heads, head_dim]`` weight). LayerNorm/RMSNorm q/k norms are
    #: layout-free (they normalise the last dim).
    qk_norm_layout: str = "bhtd"
    causal: bool = True
    #: Attention score scale. None: the attention module's ``scaling`` attribute, else ``head_dim ** -0.5``.
    #: Gemma-2's ``query_pre_attn_scalar ** -0.5`` and MPT's ``softmax_scale`` are given here.
    scale: ValueSource = None
    #: Soft-capping of the attention scores, ``cap * tanh(scores / cap)`` before the mask and softmax
    #: (Gemma-2 ``attn_logit_softcapping``). None or 0: off.
    logit_softcap: ValueSource = None
    #: ALiBi linear position biases instead of rotary (BLOOM, MPT): score ``+= slope_h * (key - query)``
    #: with the standard geometric slopes of the head count and maximal bias ``alibi_max_bias``.
    alibi: bool = False
    alibi_max_bias: ValueSource = 8.0
    #: Clamp the q, k and v projections to ``[-c, c]`` before anything else (OLMo / MPT ``clip_qkv``).
    clip_qkv: ValueSource = None
    #: The layer receives a boolean mask that is True where attention is *blocked* (MPT, whose model turns
    #: an additive mask into booleans); the usual convention (SDPA's) is True = attend.
    inverted_bool_mask: bool = False
    #: Attribute of the attention module that, when False, turns rotary off for that layer (SmolLM3
    #: ``use_rope``: its NoPE layers). None: every layer uses ``rotary``.
    rotary_switch: Optional[str] = None
    #: Attributes the module's own forward uses to reshape, rewritten per rank by tensor parallelism:
    #: attribute path (relative to ``module``) -> quantity, one of ``heads``, ``kv_heads``, ``hidden``
    #: (q heads x head_dim), ``kv_hidden``, ``kv_groups`` (q heads per kv head).
    tp_attributes: Mapping[str, str] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        separate = (self.q, self.k, self.v)
        if self.qkv is None and not all(separate):
            raise PolicyError("AttentionSpec needs q, k and v projections, or a fused qkv projection")
        if self.qkv is not None and any(separate):
            raise PolicyError("AttentionSpec takes either q/k/v or a fused qkv, not both")
        if self.rotary not in (None, "half", "interleaved"):
            raise PolicyError(f"AttentionSpec.rotary must be 'half', 'interleaved' or None, got {self.rotary!r}")
        if self.rotary_tables not in (None, "half"):
            raise PolicyError(f"AttentionSpec.rotary_tables must be 'half' or None, got {self.rotary_tables!r}")
        if self.qk_norm_layout not in ("bhtd", "bthd"):
            raise PolicyError(f"AttentionSpec.qk_norm_layout must be 'bhtd' or 'bthd', got {self.qk_norm_layout!r}")
        if self.alibi and self.rotary is not None:
            raise PolicyError("AttentionSpec takes either ALiBi (alibi=True) or rotary, not both")

    def path(self, name: Optional[str]) -> Optional[str]:
        """Layer-relative path of one of this role's submodules."""
        if name is None:
            return None
        return f"{self.module}.{name}" if self.module else name


@attrs.frozen
class MLPSpec:
    """The MLP role: gated (gate/up/down or a fused gate_up) or plain (fc1/fc2)."""

    module: str = ""
    gate: Optional[str] = None
    up: Optional[str] = None
    gate_up: Optional[str] = None
    down: Optional[str] = None
    fc1: Optional[str] = None
    fc2: Optional[str] = None
    activation: Activation = attrs.field(default=Activation.SILU, converter=Activation)
    #: Attributes rewritten per rank (path relative to ``module`` -> ``intermediate``).
    tp_attributes: Mapping[str, str] = attrs.field(factory=dict, converter=dict)

    def __attrs_post_init__(self) -> None:
        gated = self.gate is not None or self.up is not None or self.gate_up is not None
        plain = self.fc1 is not None or self.fc2 is not None
        if gated == plain:
            raise PolicyError("MLPSpec is either gated (gate/up/down or gate_up/down) or plain (fc1/fc2)")
        if gated and (self.down is None or (self.gate_up is None and (self.gate is None or self.up is None))):
            raise PolicyError("a gated MLPSpec needs gate and up (or gate_up) and down")
        if plain and (self.fc1 is None or self.fc2 is None):
            raise PolicyError("a plain MLPSpec needs fc1 and fc2")

    @property
    def gated(self) -> bool:
        return self.fc1 is None

    def path(self, name: Optional[str]) -> Optional[str]:
        if name is None:
            return None
        return f"{self.module}.{name}" if self.module else name


@attrs.frozen
class NormSpec:
    """One norm submodule (path relative to the layer, or to the model for the final norm)."""

    path: str
    kind: NormKind = attrs.field(default=NormKind.RMS, converter=NormKind)
    #: Attribute holding epsilon on the module (first present wins).
    eps_attr: tuple = attrs.field(default=("variance_epsilon", "eps", "epsilon"), converter=_tuple_of_str)
    #: Gemma-style norms scale by ``(offset + weight)``.
    weight_offset: float = 0.0
    #: Compute in fp32 and keep the weight in fp32 under a 16-bit dtype pass.
    keep_fp32: bool = False
    #: Epsilon for a norm module that stores none (OLMo's parameter-free ``OlmoLayerNorm``: 1e-5); an
    #: epsilon attribute on the module wins.
    eps: Optional[float] = None


@attrs.frozen
class Policy:
    """Declarative description of one layer class.

    ``layer`` is the class object or its fully qualified name (resolved lazily, so a plugin never needs to
    import ``transformers`` at load time). ``styles`` gives explicit tensor-parallel styles for linears
    (path relative to the layer), overriding the styles derived from the roles.
    """

    layer: Union[type, str]
    attention: Optional[AttentionSpec] = None
    mlp: Optional[MLPSpec] = None
    norms: tuple = attrs.field(default=(), converter=tuple)
    block: BlockKind = attrs.field(default=BlockKind.OPAQUE, converter=BlockKind)
    #: Names of the norm before attention and the norm before the MLP (PRE_NORM / PARALLEL blocks), or
    #: after attention / after MLP (POST_NORM). Used by the block-level residual fusion.
    input_norm: Optional[str] = None
    post_attention_norm: Optional[str] = None
    #: Sandwich norms: a norm applied to the attention output and one applied to the MLP output before each
    #: residual add (Gemma-2/3 ``post_attention_layernorm``/``post_feedforward_layernorm``, OLMo-2). A
    #: pre_norm block then runs ``h = x + attn_out_norm(attn(norm1(x)))``; ``out = h + mlp_out_norm(mlp(
    #: norm2(h)))``, where ``input_norm``/``post_attention_norm`` may be None (OLMo-2 has no input norms).
    attention_output_norm: Optional[str] = None
    mlp_output_norm: Optional[str] = None
    #: Scale of each branch before its residual add, ``x + s * branch`` (Granite ``residual_multiplier``).
    residual_scale: ValueSource = None
    styles: Mapping[str, Style] = attrs.field(factory=dict, converter=lambda d: {k: Style(v) for k, v in dict(d).items()})
    #: Linear-like submodules (relative to the layer) that store weights as ``[in, out]`` (GPT-2 ``Conv1D``).
    transposed: tuple = attrs.field(default=(), converter=_tuple_of_str)
    #: Where this policy came from ("plugin llama", "injection_policy", ...); filled in on registration.
    source: str = ""
    #: Style of every linear inside the layer that neither a role nor ``styles`` covers (DeepSpeed's short
    #: form sets COLUMN: "every other linear is column-parallel"). None leaves such linears to the lint.
    default_style: Optional[Style] = attrs.field(default=None, converter=attrs.converters.optional(Style))
    #: The layer's sparse mixture-of-experts block (:class:`~policyinject.policy.moe.MoESpec`), in the MLP
    #: slot: in a layer whose submodule at ``moe.module`` is of ``moe.block``'s class it is the MLP and
    #: ``mlp`` is ignored; in other layers of the class (Qwen2-MoE ``mlp_only_layers``) ``mlp`` applies.
    moe: Any = attrs.field(default=None)

    @moe.validator
    def _check_moe(self, attribute: Any, value: Any) -> None:
        from .moe import MoESpec

        if value is not None and not isinstance(value, MoESpec):
            raise PolicyError(f"Policy.moe must be a MoESpec, got {type(value).__name__}")

    def moe_for(self, layer: Any) -> Any:
        """The :class:`~policyinject.policy.moe.MoESpec` when ``layer`` holds this policy's MoE block, else None.

        Example:
            >>> import torch
            >>> Policy("x.Layer").moe_for(torch.nn.Module()) is None
            True
        """
        if self.moe is None:
            return None
        try:
            block = layer.get_submodule(self.moe.module) if self.moe.module else layer
        except AttributeError:
            return None
        return self.moe if self.moe.matches(block) else None

    @property
    def layer_name(self) -> str:
        """The class's short name, for messages and tables."""
        if isinstance(self.layer, str):
            return self.layer.rsplit(".", 1)[-1]
        return self.layer.__name__

    @property
    def qualified_name(self) -> str:
        if isinstance(self.layer, str):
            return self.layer
        return qualname(self.layer)

    def resolve_layer(self) -> Optional[type]:
        """Import the layer class if it is given by name; None when its module is not importable."""
        if not isinstance(self.layer, str):
            return self.layer
        return resolve_qualified_name(self.layer)

    def matches(self, module_class: type) -> bool:
        """True when ``module_class`` is this policy's layer class (exactly, or by qualified name)."""
        if not isinstance(self.layer, str):
            return module_class is self.layer
        return qualname(module_class) == self.layer

    def linear_styles(self, moe_layer: bool = False) -> dict:
        """Every linear this policy names, with its tensor-parallel style (layer-relative path -> Style).

        ``moe_layer``: the layer holds the MoE block (:meth:`moe_for`), which takes the MLP slot: the MoE's
        shared expert is split as an MLP and its gate replicated; the router and the routed experts are not
        linears (the MoE builder of the kernel-injection pass shards them)."""
        out: dict = {}
        a = self.attention
        if a is not None:
            if a.qkv is not None:
                out[a.path(a.qkv)] = Style.PACKED_COLUMN
            else:
                for n in (a.q, a.k, a.v):
                    out[a.path(n)] = Style.COLUMN
            if a.o is not None:
                out[a.path(a.o)] = Style.ROW
        m = self.mlp
        if moe_layer:
            m = None
            mo = self.moe
            if mo.shared is not None:
                out.update(attrs.evolve(self, attention=None, mlp=attrs.evolve(
                    mo.shared, module=_join(mo.module, mo.shared.module)), styles={}, moe=None).linear_styles())
            if mo.shared_gate is not None:
                out[_join(mo.module, mo.shared_gate)] = Style.REPLICATE
        if m is not None:
            if m.gated:
                if m.gate_up is not None:
                    out[m.path(m.gate_up)] = Style.PACKED_COLUMN
                else:
                    out[m.path(m.gate)] = Style.COLUMN
                    out[m.path(m.up)] = Style.COLUMN
                out[m.path(m.down)] = Style.ROW
            else:
                out[m.path(m.fc1)] = Style.COLUMN
                out[m.path(m.fc2)] = Style.ROW
        out.update(self.styles)
        return out

    def with_source(self, source: str) -> "Policy":
        return attrs.evolve(self, source=source)

    def styles_for(self, layer: Any) -> tuple:
        """Resolve styles against one layer instance.

        Returns ``(styles, unmatched_rules, uncovered)``: ``styles`` maps the layer-relative path of every
        linear-like submodule this policy covers to its :class:`Style`; ``unmatched_rules`` lists ``styles``
        keys and role paths that name no submodule; ``uncovered`` lists linear-like submodules no rule covers.
        A ``styles`` key matches a submodule whose path equals it or ends with ``"." + key`` (so
        ``"output.dense"`` matches ``attention.output.dense`` and ``output.dense``, as in DeepSpeed).

        Example:
            >>> import torch
            >>> class B(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__(); self.fc1 = torch.nn.Linear(2, 4); self.fc2 = torch.nn.Linear(4, 2)
            >>> styles, unmatched, uncovered = Policy(B, styles={"fc2": "row"}, default_style="column").styles_for(B())
            >>> {k: v.value for k, v in styles.items()}, unmatched, uncovered
            ({'fc2': 'row', 'fc1': 'column'}, [], [])
        """
        linears = {name: mod for name, mod in layer.named_modules() if name and is_linear_like(mod)}
        modules = dict(layer.named_modules())
        derived = self.linear_styles(moe_layer=self.moe_for(layer) is not None)
        explicit = set(self.styles)
        out: dict = {}
        unmatched: list = []
        for path, style in derived.items():
            if path in explicit:
                continue
            if path in modules:
                out[path] = style
            else:
                unmatched.append(path)
        for key, style in self.styles.items():
            hits = [n for n in linears if n == key or n.endswith("." + key)]
            if not hits and key in modules:
                hits = [key]
            if not hits:
                unmatched.append(key)
            for n in hits:
                out[n] = style
        uncovered = []
        for name in linears:
            if name in out:
                continue
            if self.default_style is not None:
                out[name] = self.default_style
            else:
                uncovered.append(name)
        return out, unmatched, uncovered


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def is_linear_like(module: Any) -> bool:
    """True for ``nn.Linear`` (and subclasses), GPT-2 style ``Conv1D`` and modules marked ``_policyinject_linear``."""
    import torch

    if isinstance(module, torch.nn.Linear) or getattr(module, "_policyinject_linear", False):
        return True
    return is_conv1d(module)


@attrs.frozen
class ModelPolicy:
    """The model around the blocks. Paths are relative to the top-level model object."""

    model: Union[type, str]
    layers: str
    embed: Optional[str] = None
    #: Learned absolute position embeddings (GPT-2 ``transformer.wpe``, OPT ``embed_positions``).
    position_embed: Optional[str] = None
    final_norm: Optional[NormSpec] = None
    lm_head: Optional[str] = None
    #: The module that computes rotary (cos, sin) once per forward (HF ``model.rotary_emb``).
    rotary_emb: Optional[str] = None
    #: Norm applied right after the embedding (BLOOM ``word_embeddings_layernorm``).
    embed_norm: Optional[NormSpec] = None
    #: Factor on the token embeddings (Granite ``embedding_multiplier``). Gemma's ``sqrt(hidden)`` lives
    #: in its embedding module and needs nothing here.
    embed_scale: ValueSource = None
    #: Factor on the logits (Cohere ``logit_scale``; Granite ``1 / logits_scaling``).
    logit_scale: ValueSource = None
    #: Soft-capping of the final logits, ``cap * tanh(logits / cap)`` (Gemma-2 ``final_logit_softcapping``).
    final_logit_softcap: ValueSource = None
    #: The rotary module takes the layer's type (``config.layer_types[i]``) as a third argument and keeps one
    #: table per type (Gemma-3: local and global layers have different bases).
    rotary_per_layer_type: bool = False
    #: Tensor-parallel styles of model-level modules (model-relative path -> Style); by default the
    #: embedding is VOCAB_EMBEDDING and the head VOCAB_HEAD.
    styles: Mapping[str, Style] = attrs.field(factory=dict, converter=lambda d: {k: Style(v) for k, v in dict(d).items()})
    source: str = ""

    @property
    def model_name(self) -> str:
        if isinstance(self.model, str):
            return self.model.rsplit(".", 1)[-1]
        return self.model.__name__

    def with_source(self, source: str) -> "ModelPolicy":
        return attrs.evolve(self, source=source)


def resolve_qualified_name(name: str) -> Optional[type]:
    """Import ``package.module.Class``; None if the module cannot be imported or lacks the class.

    Example:
        >>> resolve_qualified_name("collections.OrderedDict").__name__
        'OrderedDict'
        >>> resolve_qualified_name("no_such_module.Thing") is None
        True
    """
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) else None
