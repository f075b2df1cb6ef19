"""The key registry: every configuration key, its aliases, default, status and meaning, in one table.

This table is the single source for: the attrs field defaults (``model.py``), alias and deprecation
handling (``normalize.py``), the warnings and errors for values policyinject cannot honour (``checks.py``),
the JSON Schema (``schema.py``) and the key table of ``docs/config.md`` (``doc_table.py``).

Statuses:

- ``works``: policyinject implements the key.
- ``warns``: accepted; a non-default value has no effect here and gives a ``UserWarning`` naming the key.
- ``error``: accepted with its default; a non-default value is a ``ConfigError`` naming the key.

For ``warns`` and ``error`` keys, ``note`` is the reason; it completes "... is ignored here: " or
"... is not supported: ".
- ``deprecated``: DeepSpeed's deprecated key; moved to ``new`` with a ``DeprecationWarning`` (or, without
  ``new``, dropped with one). Giving it together with its replacement is a ``ConfigError``.
- ``section``: a nested config.

Example:
    >>> spec_for("tensor_parallel.tp_grain_size").default
    64
    >>> spec_for("max_out_tokens").aliases, lookup("", "tp").path
    (('max_tokens',), 'tensor_parallel')
    >>> lookup("", "mp_size").new
    'tensor_parallel.tp_size'
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import attrs

from . import patterns as pat
from . import values as v
from .dtypes import DTYPE_SPELLINGS, normalize_dtype
from .tp_plan import HF_TP_STYLES, check_tp_plan


class Status(str, enum.Enum):
    WORKS = "works"
    WARNS = "warns"
    ERROR = "error"
    DEPRECATED = "deprecated"
    SECTION = "section"


@attrs.frozen
class KeySpec:
    """One configuration key. ``path`` is its canonical dotted path (for deprecated keys, the old path)."""

    path: str
    type: str
    default: Any
    meaning: str
    aliases: tuple = ()
    status: Status = Status.WORKS
    #: Deprecated keys: the canonical path the value moves to (None: the key is only warned about).
    new: Optional[str] = None
    #: What a non-default value does (warns/error keys), or how we differ from DeepSpeed.
    note: str = ""
    #: "auto" is a real value of this key (otherwise "auto" means "use the default").
    auto_value: bool = False
    #: Value converter (strict, idempotent); None for sections and deprecated keys.
    convert: Optional[Callable[[Any], Any]] = None
    #: JSON form of a value for ``to_dict``.
    dump: Callable[[Any], Any] = v.dump_plain
    #: JSON Schema fragment for a value.
    schema: Mapping = attrs.field(factory=dict, converter=MappingProxyType)
    #: "deepspeed" (DeepSpeed's vocabulary) or "policyinject" (our own key).
    origin: str = "deepspeed"
    #: Stored on the attrs class (False for deprecated and DeepSpeed-internal keys).
    field: bool = True
    #: Sections only: the attrs class name, and the field a bare bool sets (``moe: true``).
    cls: Optional[str] = None
    bool_key: Optional[str] = None

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def parent(self) -> str:
        return self.path.rpartition(".")[0]

    @property
    def section(self) -> bool:
        return self.status is Status.SECTION

    def make_default(self) -> Any:
        """A fresh copy of the default (mutable defaults are stored read-only)."""
        if isinstance(self.default, MappingProxyType):
            return dict(self.default)
        return self.default


_EMPTY = MappingProxyType({})
_BOOL = {"type": "boolean"}
_POS_INT = {"type": "integer", "minimum": 1}
_OPT_POS_INT = {"type": ["integer", "null"], "minimum": 1}
_OPT_STR = {"type": ["string", "null"]}
_OBJECT = {"type": "object"}
_LIVE = {"type": "null", "description": "A live Python object (only null can be written in JSON)."}
_QTYPE = v.choice("symmetric", "asymmetric")
_PATTERNS = {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 1, "maxLength": 256},
                       {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256},
                        "minItems": 1, "maxItems": 256}]}
_NAMES = {"anyOf": [{"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]}


def _quant_params(section: str, enabled_default: bool, status: Status, note: str,
                  q_type: Optional[KeySpec] = None) -> tuple:
    """``enabled``, ``num_bits``, ``q_type`` and ``q_groups`` of a quant section; ``q_type`` replaces the
    DeepSpeed ``q_type`` key (default "symmetric") where the section gives its own."""
    return (
        KeySpec(f"{section}.enabled", "bool", enabled_default, "Quantize this kind of tensor.",
                status=Status.ERROR if section.endswith("activation") else Status.WORKS,
                note=note, convert=v.boolean, schema=_BOOL),
        KeySpec(f"{section}.num_bits", "4 or 8", 8, "Bit width.", status=status, convert=v.num_bits,
                schema={"enum": [4, 8]},
                note="" if status is Status.WORKS else "only used by activation quantization, which is not implemented"),
        q_type or KeySpec(f"{section}.q_type", '"symmetric" | "asymmetric"', "symmetric",
                          "Symmetric (scale only) or asymmetric (scale and zero point) quantization.", status=status,
                          convert=_QTYPE, schema={"enum": ["symmetric", "asymmetric"]},
                          note="" if status is Status.WORKS else "only used by activation quantization, which is not implemented"),
        KeySpec(f"{section}.q_groups", "int >= 1", 1,
                "Quantization groups per output row (G groups: group size = in_features / G).", status=status,
                convert=v.positive_int, schema=_POS_INT,
                note="" if status is Status.WORKS else "only used by activation quantization, which is not implemented"),
    )


#: Every key, section by section. Order is the order of the docs table.
KEYS: tuple = (
    # ---- top level ---------------------------------------------------------------------------------
    KeySpec("replace_with_kernel_inject", "bool", False,
            "Replace each matched layer by fused Triton kernels (injected attention/MLP/blocks).",
            aliases=("kernel_inject",), convert=v.boolean, schema=_BOOL),
    KeySpec("dtype", "dtype", "auto",
            "Target dtype: fp16/float16/half, bf16/bfloat16/bfloat, fp32/float32/float, int8 (int8 weights, "
            "16-bit activations; turns on 8-bit weight quantization), any torch.* spelling or a torch.dtype, "
            'or "auto".',
            note='Default "auto" (DeepSpeed: fp16): keep a 16-bit model\'s dtype; on CUDA an fp32 model goes to '
                 "bf16 (fp16 without bf16 support); on the CPU keep the model's dtype.",
            auto_value=True, convert=normalize_dtype, schema={"type": "string", "enum": sorted(DTYPE_SPELLINGS)}),
    KeySpec("tensor_parallel", "mapping", _EMPTY, "Tensor-parallel settings.", aliases=("tp",),
            status=Status.SECTION, cls="TensorParallelConfig"),
    KeySpec("enable_cuda_graph", "bool", False,
            "Capture the decode step / forward in CUDA graphs and replay them.",
            note="With tensor_parallel.tp_size > 1 (DeepSpeed rejects every such config): accepted where the "
                 "all-reduces can be captured (NCCL on CUDA); on any other backend (gloo, the CPU) init_inference "
                 "refuses it while planning, before the model is changed.",
            convert=v.boolean, schema=_BOOL),
    KeySpec("use_triton", "bool", False, "DeepSpeed: use its Triton kernels (BERT container only).",
            status=Status.WARNS,
            note="injected kernels are already Triton on CUDA; choose with `kernel_backend`",
            convert=v.boolean, schema=_BOOL),
    KeySpec("triton_autotune", "bool", False, "DeepSpeed: autotune its Triton matmul.", status=Status.WARNS,
            note="policyinject's kernels pick their own launch configurations",
            convert=v.boolean, schema=_BOOL),
    KeySpec("zero", "mapping", _EMPTY, "DeepSpeed ZeRO config (never read by DeepSpeed-Inference either).",
            status=Status.WARNS, note="ZeRO-Inference offload is not supported",
            convert=v.mapping, schema=_OBJECT),
    KeySpec("triangular_masking", "bool", True, "DeepSpeed: causal masking in the kernel (unused there).",
            aliases=("tm",), status=Status.WARNS,
            note="causality comes from the layer's policy (AttentionSpec.causal)",
            convert=v.boolean, schema=_BOOL),
    KeySpec("moe", "bool or mapping", _EMPTY, "Mixture-of-experts settings; a bool sets moe.enabled.",
            status=Status.SECTION, cls="MoEConfig", bool_key="enabled"),
    KeySpec("keep_module_on_host", "bool", False,
            "Keep parameters on the CPU (no final move to the GPU; tensor-parallel shards stay on the host).",
            convert=v.boolean, schema=_BOOL),
    KeySpec("quant", "mapping", _EMPTY, "Weight quantization settings.", status=Status.SECTION,
            cls="QuantizationConfig"),
    KeySpec("checkpoint", "path or mapping", None,
            "Checkpoint description (DeepSpeed JSON: type, checkpoints, version, parallelization, tp_size, "
            "base_dir) as a path to the JSON file or the mapping itself.",
            convert=v.checkpoint, schema={"anyOf": [{"type": "string", "minLength": 1}, _OBJECT, {"type": "null"}]}),
    KeySpec("base_dir", "str", "", "Root directory of the checkpoint file names.", convert=v.text,
            schema={"type": "string"}),
    KeySpec("set_empty_params", "bool", False, "DeepSpeed: create kernel modules with empty tensors.",
            status=Status.WARNS, note="injected modules take their weights from the layer they replace",
            convert=v.boolean, schema=_BOOL),
    KeySpec("save_mp_checkpoint_path", "str or null", None,
            "Write the tensor-parallel-resharded checkpoint here.", convert=v.optional_text, schema=_OPT_STR),
    KeySpec("checkpoint_config", "mapping", _EMPTY, "DeepSpeed's InferenceCheckpointConfig (unused there).",
            aliases=("ckpt_config",), status=Status.SECTION, cls="CheckpointConfig"),
    KeySpec("return_tuple", "bool", True, "DeepSpeed: kernel layers return a tuple rather than a tensor.",
            status=Status.ERROR,
            note="an injected layer always returns what the layer it replaces returns",
            convert=v.boolean, schema=_BOOL),
    KeySpec("training_mp_size", "int >= 1", 1, "DeepSpeed: TP degree the checkpoint was saved with.",
            status=Status.WARNS,
            note="the checkpoint's tensor-parallel degree comes from its description (tp_size / mp_size)",
            convert=v.positive_int, schema=_POS_INT),
    KeySpec("replace_method", "str", "auto", "DeepSpeed: no longer needed.", status=Status.DEPRECATED,
            note="policyinject, like current DeepSpeed, does not need it", auto_value=True, field=False, schema={"type": "string"}),
    KeySpec("injection_policy", "mapping or null", None,
            "{layer class or 'pkg.mod.Class': row-parallel linear name(s) or a policyinject Policy}. The names "
            "are the row-parallel linears; every other linear of the layer is column-parallel.",
            aliases=("injection_dict",),
            note="Allowed together with replace_with_kernel_inject (DeepSpeed forbids the combination).",
            convert=v.injection_policy, dump=v.dump_injection_policy,
            schema={"type": ["object", "null"], "additionalProperties": _NAMES}),
    KeySpec("injection_policy_tuple", "tuple or null", None, "DeepSpeed-internal: the engine writes it.",
            status=Status.WARNS, note="it is internal to DeepSpeed; give `injection_policy`", field=False,
            schema={"type": ["array", "null"]}),
    KeySpec("config", "mapping or null", None,
            "Model config used instead of model.config (head counts, sizes); a mapping or a config object.",
            aliases=("args",),
            note="As a keyword argument use `args=` (load_config's first parameter is named config).",
            convert=v.model_config, dump=v.dump_model_config, schema={"type": ["object", "null"]}),
    KeySpec("max_out_tokens", "int >= 1", 1024, "Token budget (prompt + generated) of the KV cache.",
            aliases=("max_tokens",), convert=v.positive_int, schema=_POS_INT),
    KeySpec("min_out_tokens", "int >= 1", 1, "Minimum generation budget the engine guarantees.",
            aliases=("min_tokens",), note="Must be <= max_out_tokens.", convert=v.positive_int, schema=_POS_INT),
    KeySpec("transposed_mode", "bool", False, "DeepSpeed: transposed weight layout in its kernels.",
            status=Status.WARNS, note="each policy says which linears are stored transposed",
            convert=v.boolean, schema=_BOOL),
    KeySpec("mp_size", "int >= 1", 1, "Old tensor-parallel degree.", status=Status.DEPRECATED,
            new="tensor_parallel.tp_size", field=False, schema=_POS_INT),
    KeySpec("mpu", "object", None, "Old model-parallel unit.", status=Status.DEPRECATED,
            new="tensor_parallel.mpu", field=False, schema=_LIVE),
    KeySpec("ep_size", "int >= 1", 1, "Old expert-parallel size.", status=Status.DEPRECATED, new="moe.ep_size",
            field=False, schema=_POS_INT),
    KeySpec("ep_group", "object", None, "Old expert-parallel group.", aliases=("expert_group",),
            status=Status.DEPRECATED, new="moe.ep_group", field=False, schema=_LIVE),
    KeySpec("ep_mp_group", "object", None, "Old expert model-parallel group.", aliases=("expert_mp_group",),
            status=Status.DEPRECATED, new="moe.ep_mp_group", field=False, schema=_LIVE),
    KeySpec("moe_experts", "list of int", (1,), "Old expert counts.", status=Status.DEPRECATED,
            new="moe.moe_experts", field=False, schema={"type": "array", "items": _POS_INT}),
    KeySpec("moe_type", "str", "standard", "Old MoE type.", status=Status.DEPRECATED, new="moe.type",
            field=False, schema={"enum": ["standard", "residual"]}),
    KeySpec("kernel_backend", '"auto" | "triton" | "torch"', "auto",
            "Kernel implementation of injected modules: auto = Triton on CUDA tensors, the PyTorch reference "
            "elsewhere; triton forces Triton (CPU only under TRITON_INTERPRET=1); torch forces the reference.",
            auto_value=True, convert=v.choice("auto", "triton", "torch"), schema={"enum": ["auto", "triton", "torch"]},
            origin="policyinject"),
    KeySpec("max_batch_size", "int >= 1 or null", None,
            "Batch size of the decode engine's static KV cache; null sizes it at the first generate call.",
            convert=v.optional_positive_int, schema=_OPT_POS_INT, origin="policyinject"),
    KeySpec("cuda_graph_cache_size", "int >= 1", 8,
            "How many captured CUDA-graph signatures to keep (least recently used is evicted).",
            convert=v.positive_int, schema=_POS_INT, origin="policyinject"),
    # ---- tensor_parallel ---------------------------------------------------------------------------
    KeySpec("tensor_parallel.enabled", "bool", True, "Tensor parallelism on (DeepSpeed never reads it).",
            note="False together with tp_size > 1 is an error.", convert=v.boolean, schema=_BOOL),
    KeySpec("tensor_parallel.tp_size", "int >= 1", 1, "Tensor-parallel degree.", convert=v.positive_int,
            schema=_POS_INT),
    KeySpec("tensor_parallel.tp_grain_size", "int >= 1", 64,
            "Shard granularity of MLP and vocabulary splits (uneven sizes are dealt out in grains).",
            convert=v.positive_int, schema=_POS_INT),
    KeySpec("tensor_parallel.mpu", "object", None,
            "Megatron-style model-parallel unit; its group is used as the tensor-parallel group.",
            convert=v.mpu, dump=v.dump_object, schema=_LIVE),
    KeySpec("tensor_parallel.tp_group", "process group", None,
            "Tensor-parallel process group (default: all ranks of the default group).",
            convert=v.process_group, dump=v.dump_object, schema=_LIVE),
    KeySpec("tensor_parallel.tp_plan", 'null, "auto" or mapping', None,
            "Hugging Face TP plan {module glob: style}; \"auto\" uses the model's own base_model_tp_plan.",
            auto_value=True, convert=check_tp_plan, origin="policyinject",
            schema={"anyOf": [{"type": "null"}, {"const": "auto"},
                              {"type": "object", "additionalProperties": {"enum": list(HF_TP_STYLES)}}]}),
    KeySpec("tensor_parallel.setup_timeout_s", "number > 0", 300.0,
            "Seconds each rank waits for the other ranks of its tensor-parallel group at setup (process-group "
            "rendezvous and the config/model agreement check) before raising an error naming the ranks that did "
            "not arrive.", convert=v.positive_seconds, schema={"type": "number", "exclusiveMinimum": 0},
            origin="policyinject"),
    # ---- moe -----------------------------------------------------------------------------------------
    KeySpec("moe.enabled", "bool", True, "MoE handling on (DeepSpeed never reads it).",
            note="False keeps every MoE block as the model has it (no injection, no expert parallelism, no "
                 "expert quantization).", convert=v.boolean, schema=_BOOL),
    KeySpec("moe.ep_size", "int >= 1", 1, "Expert-parallel group size.",
            note="Needs replace_with_kernel_inject. Experts are split over the EP group (see docs/moe.md for the "
                 "group layout with tensor parallelism); the model's expert count must be a multiple.",
            convert=v.positive_int, schema=_POS_INT),
    KeySpec("moe.moe_experts", "list of int >= 1", (1,), "Global expert count(s).", aliases=("num_experts",),
            note="The expert count is read from the model; a given list must include it (checked at plan time).",
            convert=v.experts, schema={"anyOf": [_POS_INT, {"type": "array", "items": _POS_INT, "minItems": 1}]}),
    KeySpec("moe.type", '"standard" | "residual"', "standard", "MoE type.", status=Status.ERROR,
            note="residual MoE (DeepSpeed's PR-MoE) is not implemented: no supported model family has one",
            convert=v.choice("standard", "residual"), schema={"enum": ["standard", "residual"]}),
    KeySpec("moe.ep_group", "process group", None, "Expert-parallel group.", aliases=("expert_group",),
            note="Used as given (its size must equal moe.ep_size); default: built from the world, tp_size and "
                 "ep_size.", convert=v.process_group, dump=v.dump_object, schema=_LIVE),
    KeySpec("moe.ep_mp_group", "process group", None, "Expert model-parallel group.", aliases=("expert_mp_group",),
            note="The ranks over which each expert's intermediate dimension is sliced (they must hold the same "
                 "tokens); default: the tensor-parallel group.", convert=v.process_group, dump=v.dump_object,
            schema=_LIVE),
    # ---- quant -----------------------------------------------------------------------------------------
    KeySpec("quant.enabled", "bool", False, "Quantize weights (see quant.weight).",
            note="Default False (DeepSpeed: True, but never read). dtype int8 turns it on.",
            convert=v.boolean, schema=_BOOL),
    KeySpec("quant.activation", "mapping", _EMPTY, "Activation quantization.", status=Status.SECTION,
            cls="ActivationQuantConfig"),
    *_quant_params("quant.activation", False, Status.WARNS,
                   "activation quantization is not implemented: quantization here is weight-only "
                   "(quant.weight), activations stay 16-bit (default false; DeepSpeed's true is never read)"),
    KeySpec("quant.weight", "mapping", _EMPTY, "Weight quantization.", status=Status.SECTION, cls="WeightQuantConfig"),
    *_quant_params("quant.weight", True, Status.WORKS, "Used when quant.enabled is true.", q_type=KeySpec(
        "quant.weight.q_type", '"auto" | "symmetric" | "asymmetric"', "auto",
        "Symmetric (scale only) or asymmetric (scale and zero point) quantization; auto: symmetric for 8 bits, "
        "asymmetric for 4 bits. An explicit value is always used.",
        note='Default "auto" (DeepSpeed: "symmetric"): asymmetric int4 (with the default group 32 and HQQ) is '
             "the accurate calibration-free int4; int8 stays symmetric.",
        convert=v.choice("auto", "symmetric", "asymmetric"), schema={"enum": ["auto", "symmetric", "asymmetric"]})),
    KeySpec("quant.weight.group_size", "int >= 1 or null", None,
            "Quantization group size along the input features; an alternative to q_groups "
            "(q_groups G == group_size in_features / G). Setting it with q_groups > 1 is an error.",
            convert=v.optional_positive_int, schema=_OPT_POS_INT, origin="policyinject"),
    KeySpec("quant.weight.method", '"auto" | "rtn" | "hqq" | "gptq" | "awq"', "auto",
            "How the weights are rounded: rtn (round to nearest from absmax / min-max), "
            "hqq (half-quadratic search of each group's zero point, no calibration data; asymmetric only), "
            "gptq (error-compensating, on calibration data: quant.calibration), awq (activation-aware input "
            "scales folded into the preceding norm or linear, and clipping, on calibration data), "
            "auto (hqq for asymmetric 4 bits, else rtn). The stored format is the same.",
            convert=v.choice("auto", "rtn", "hqq", "gptq", "awq"),
            schema={"enum": ["auto", "rtn", "hqq", "gptq", "awq"]}, origin="policyinject"),
    KeySpec("quant.weight.include", "null | pattern | list of patterns", None,
            "Quantize only the linears (nn.Linear, Conv1D) whose full module path matches one of these patterns "
            "(anywhere in the model, policy or not); null: the default selection (the policies' linears of "
            "matched layers; every linear of a model no policy covers). A glob (fnmatch: '*.mlp.*') or a regex "
            "prefixed 're:' ('re:.*\\.(q|k|v)_proj'), matched against the whole path. A pattern matching no "
            "linear is a plan error. The output head stays governed by quant.lm_head.",
            convert=pat.module_patterns, dump=v.dump_plain, schema=_PATTERNS, origin="policyinject"),
    KeySpec("quant.weight.exclude", "null | pattern | list of patterns", None,
            "Never quantize the linears whose full module path matches one of these patterns (same syntax as "
            "quant.weight.include; applied after it). A pattern matching no linear warns.",
            convert=pat.module_patterns, dump=v.dump_plain, schema=_PATTERNS, origin="policyinject"),
    KeySpec("quant.weight.quantized_initialization", "mapping", _EMPTY,
            "DeepSpeed ZeRO-Inference: quantize while loading.", status=Status.WARNS,
            note="weights are quantized by the quantize pass", convert=v.mapping, schema=_OBJECT),
    KeySpec("quant.weight.post_init_quant", "mapping", _EMPTY, "DeepSpeed ZeRO-Inference: quantize after init.",
            status=Status.WARNS, note="weights are quantized by the quantize pass", convert=v.mapping,
            schema=_OBJECT),
    KeySpec("quant.qkv", "mapping", _EMPTY, "Quantization of the q/k/v projections.", status=Status.SECTION,
            cls="QKVQuantConfig"),
    KeySpec("quant.qkv.enabled", "bool", True, "Quantize q/k/v (and fused qkv) projections too.",
            convert=v.boolean, schema=_BOOL),
    KeySpec("quant.lm_head", "mapping", _EMPTY, "Quantization of the output head.", status=Status.SECTION,
            cls="HeadQuantConfig", origin="policyinject"),
    KeySpec("quant.lm_head.enabled", "bool", False,
            "Quantize the output head (lm_head) with quant.weight's bits, group size and type; embeddings stay "
            "16-bit (a tied head gets its own quantized copy).", convert=v.boolean, schema=_BOOL,
            origin="policyinject"),
    KeySpec("quant.checkpoint", "str or null", None,
            "Load the quantized weights from this safetensors file (written by policyinject.quant.save_quantized "
            "or InferenceEngine.save_quantized) instead of quantizing: calibration runs once. The file's "
            "quantization settings must equal this config's; any difference is an error naming the keys.",
            convert=v.optional_text, schema=_OPT_STR, origin="policyinject"),
    KeySpec("quant.calibration", "mapping", _EMPTY, "Calibration input of the calibrated methods (gptq, awq).",
            status=Status.SECTION, cls="CalibrationConfig", origin="policyinject"),
    KeySpec("quant.calibration.data", "null | text file path | list of token-id tensors | callable", None,
            "Calibration input: null (the text shipped with the package: a snapshot of its own documentation), "
            "a UTF-8 text file, a list of integer token-id tensors ([seq] or [rows, seq]), or a callable "
            "returning an iterable of them. Text needs quant.calibration.tokenizer.",
            convert=v.calibration_data, dump=v.dump_path_or_object,
            schema={"type": ["string", "null"], "description": "A text file path or null; lists of tensors and "
                    "callables are live Python objects."}, origin="policyinject"),
    KeySpec("quant.calibration.num_samples", "int >= 1", 8,
            "Calibration rows (text: windows drawn at seeded random offsets; tensors: the first rows).",
            convert=v.positive_int, schema=_POS_INT, origin="policyinject"),
    KeySpec("quant.calibration.seq_len", "int >= 2", 512, "Tokens per calibration row (longer rows are cut).",
            convert=v.int_at_least(2), schema={"type": "integer", "minimum": 2}, origin="policyinject"),
    KeySpec("quant.calibration.seed", "int >= 0", 0, "Seed of the text windows' offsets (same seed, same rows).",
            convert=v.int_at_least(0), schema={"type": "integer", "minimum": 0}, origin="policyinject"),
    KeySpec("quant.calibration.tokenizer", "tokenizer or null", None,
            "Tokenizer for text calibration input (a Hugging Face tokenizer, or a callable text -> "
            "{'input_ids': ...}, or an object with encode()).",
            convert=v.tokenizer, dump=v.dump_object, schema=_LIVE, origin="policyinject"),
    KeySpec("quant.calibration.act_order", "bool", True,
            "gptq: quantize columns by decreasing activation (Hessian diagonal), with the contiguous groups the "
            "kernels expect (static groups). Read by gptq only.",
            convert=v.boolean, schema=_BOOL, origin="policyinject"),
    KeySpec("quant.calibration.gptq_grid", '"minmax" | "hqq"', "minmax",
            "gptq with act_order: how the static groups' scales and zero points are found. minmax: each "
            "group's range; hqq: for asymmetric int4, the zero points HQQ optimises on the original weights "
            "(a smaller weight error; +8.1% against +8.4% perplexity on Qwen2.5-Coder-0.5B int4 g32). Read by "
            "gptq only.",
            convert=v.choice("minmax", "hqq"), schema={"type": "string", "enum": ["minmax", "hqq"]},
            origin="policyinject"),
    KeySpec("quant.calibration.damp", "number > 0", 0.1,
            "gptq: the damping added to the Hessian's diagonal, as a fraction of its mean (the GPTQ paper uses "
            "0.01). Read by gptq only.",
            convert=v.positive_number, schema={"type": "number", "exclusiveMinimum": 0}, origin="policyinject"),
    # ---- checkpoint_config -----------------------------------------------------------------------------
    KeySpec("checkpoint_config.checkpoint_dir", "str or null", None, "DeepSpeed: unused (TODO there).",
            status=Status.WARNS, note="use the top-level `checkpoint`", convert=v.optional_text,
            schema=_OPT_STR),
    KeySpec("checkpoint_config.save_mp_checkpoint_path", "str or null", None, "DeepSpeed: unused (TODO there).",
            status=Status.WARNS, note="use the top-level `save_mp_checkpoint_path`",
            convert=v.optional_text, schema=_OPT_STR),
    KeySpec("checkpoint_config.base_dir", "str or null", None, "DeepSpeed: unused (TODO there).",
            status=Status.WARNS, note="use the top-level `base_dir`", convert=v.optional_text,
            schema=_OPT_STR),
)

#: Canonical path -> spec.
SPECS = MappingProxyType({s.path: s for s in KEYS})

#: Section path ("" is the top level) -> attrs class name.
SECTIONS = MappingProxyType({"": "InferenceConfig", **{s.path: s.cls for s in KEYS if s.section}})


def _names_by_section() -> Mapping:
    table: dict = {section: {} for section in SECTIONS}
    for spec in KEYS:
        for name in (spec.name, *spec.aliases):
            table[spec.parent][name] = spec
    return MappingProxyType({k: MappingProxyType(t) for k, t in table.items()})


#: Section path -> {every accepted spelling (name, alias, deprecated name): spec}.
NAMES = _names_by_section()


def spec_for(path: str) -> KeySpec:
    """The spec of a canonical path.

    Example:
        >>> spec_for("quant.weight.num_bits").default
        8
    """
    return SPECS[path]


def lookup(section: str, name: str) -> Optional[KeySpec]:
    """The spec a spelling names inside ``section`` (canonical name, alias or deprecated name), or None.

    Example:
        >>> lookup("moe", "num_experts").path
        'moe.moe_experts'
        >>> lookup("", "tensor_paralel") is None
        True
    """
    return NAMES.get(section, {}).get(name)


def section_specs(section: str) -> tuple:
    """The specs directly inside ``section`` ("" for the top level), in table order.

    Example:
        >>> [s.name for s in section_specs("quant")]
        ['enabled', 'activation', 'weight', 'qkv', 'lm_head', 'checkpoint', 'calibration']
    """
    return _BY_SECTION.get(section, ())


def _by_section() -> Mapping:
    table: dict = {}
    for spec in KEYS:
        table.setdefault(spec.parent, []).append(spec)
    return MappingProxyType({k: tuple(v) for k, v in table.items()})


#: Section path -> its specs in table order (computed once: section_specs is on every load's hot path).
_BY_SECTION = _by_section()


def default_of(path: str) -> Any:
    """A fresh default value for a canonical path.

    Example:
        >>> default_of("max_out_tokens"), default_of("zero")
        (1024, {})
    """
    return SPECS[path].make_default()
