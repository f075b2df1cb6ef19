"""The configuration classes: frozen attrs classes with DeepSpeed's canonical attribute names.

Defaults come from the key registry (``keys.py``). Construction normalises every field with the registry's
converter (``dtype=torch.float16`` is stored as ``"fp16"``) and runs the validators; every problem of a class
is raised together as one :class:`ConfigError`. ``dtype="int8"`` turns on 8-bit weight quantization.
Mappings, aliases and deprecated keys are the job of :func:`policyinject.config.load_config`.

Example:
    >>> import torch
    >>> cfg = InferenceConfig(dtype=torch.bfloat16, tensor_parallel=TensorParallelConfig(tp_size=2))
    >>> cfg.dtype, cfg.tensor_parallel.tp_size, cfg.to_dict()["tensor_parallel"]["tp_size"]
    ('bf16', 2, 2)
    >>> InferenceConfig(dtype="int8").quant.enabled
    True
    >>> TensorParallelConfig(tp_size=0)
    Traceback (most recent call last):
    ...
    policyinject.config.errors.ConfigError: tp_size: must be >= 1, got 0
"""

from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple, Union

import attrs
import torch

from .checks import check_config, check_section, normalize_fields
from .dtypes import resolve_dtype
from .errors import ConfigError
from .keys import SPECS


def _field(path: str) -> Any:
    spec = SPECS[path]
    if isinstance(spec.default, Mapping):
        return attrs.field(factory=spec.make_default)
    return attrs.field(default=spec.default)


def _validate(obj: Any, section: str) -> None:
    problems = normalize_fields(obj, section)
    if not problems:
        problems = check_section(obj, section)
    if problems:
        raise ConfigError(problems)


@attrs.frozen
class TensorParallelConfig:
    """``tensor_parallel`` (alias ``tp``)."""

    enabled: bool = _field("tensor_parallel.enabled")
    tp_size: int = _field("tensor_parallel.tp_size")
    tp_grain_size: int = _field("tensor_parallel.tp_grain_size")
    mpu: Any = _field("tensor_parallel.mpu")
    tp_group: Any = _field("tensor_parallel.tp_group")
    tp_plan: Optional[Union[str, Mapping[str, str]]] = _field("tensor_parallel.tp_plan")
    setup_timeout_s: float = _field("tensor_parallel.setup_timeout_s")

    def __attrs_post_init__(self) -> None:
        _validate(self, "tensor_parallel")


@attrs.frozen
class MoEConfig:
    """``moe`` (``moe: true/false`` sets ``enabled``)."""

    enabled: bool = _field("moe.enabled")
    ep_size: int = _field("moe.ep_size")
    moe_experts: Tuple[int, ...] = _field("moe.moe_experts")
    type: str = _field("moe.type")
    ep_group: Any = _field("moe.ep_group")
    ep_mp_group: Any = _field("moe.ep_mp_group")

    def __attrs_post_init__(self) -> None:
        _validate(self, "moe")


@attrs.frozen
class ActivationQuantConfig:
    """``quant.activation``: validated, but activation quantization is not implemented (see docs/config.md)."""

    enabled: bool = _field("quant.activation.enabled")
    num_bits: int = _field("quant.activation.num_bits")
    q_type: str = _field("quant.activation.q_type")
    q_groups: int = _field("quant.activation.q_groups")

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant.activation")


def resolve_q_type(q_type: str, num_bits: int) -> str:
    """The quantization type used: ``"auto"`` is symmetric for 8 bits and asymmetric for 4 bits; an explicit
    ``"symmetric"`` / ``"asymmetric"`` is always used.

    Example:
        >>> resolve_q_type("auto", 8), resolve_q_type("auto", 4), resolve_q_type("symmetric", 4)
        ('symmetric', 'asymmetric', 'symmetric')
    """
    if q_type == "auto":
        return "symmetric" if int(num_bits) == 8 else "asymmetric"
    return q_type


@attrs.frozen
class WeightQuantConfig:
    """``quant.weight``: bit width, symmetric or not, and grouping (``q_groups`` or ``group_size``).

    Example:
        >>> WeightQuantConfig().symmetric, WeightQuantConfig(num_bits=4).symmetric
        (True, False)
        >>> WeightQuantConfig(num_bits=4, q_type="symmetric").symmetric
        True
    """

    enabled: bool = _field("quant.weight.enabled")
    num_bits: int = _field("quant.weight.num_bits")
    q_type: str = _field("quant.weight.q_type")
    q_groups: int = _field("quant.weight.q_groups")
    group_size: Optional[int] = _field("quant.weight.group_size")
    method: str = _field("quant.weight.method")
    include: Optional[Tuple[str, ...]] = _field("quant.weight.include")
    exclude: Optional[Tuple[str, ...]] = _field("quant.weight.exclude")
    quantized_initialization: Mapping[str, Any] = _field("quant.weight.quantized_initialization")
    post_init_quant: Mapping[str, Any] = _field("quant.weight.post_init_quant")

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant.weight")

    @property
    def symmetric(self) -> bool:
        """Whether the weights are quantized symmetrically (``q_type`` resolved by :func:`resolve_q_type`)."""
        return resolve_q_type(self.q_type, self.num_bits) == "symmetric"

    def group_size_for(self, in_features: int) -> int:
        """Group size along the input features of a linear with ``in_features`` inputs.

        ``group_size`` if set, else ``in_features // q_groups`` (q_groups G means G groups per output row);
        ``q_groups`` 1 (the default) is the quantize pass's default: one scale per output channel at 8 bits,
        group 32 at 4 bits when 32 divides ``in_features``
        (:func:`policyinject.kernels.quantize.default_group_size`).

        Example:
            >>> WeightQuantConfig(q_groups=4).group_size_for(4096), WeightQuantConfig(group_size=128).group_size_for(4096)
            (1024, 128)
            >>> WeightQuantConfig().group_size_for(4096), WeightQuantConfig(num_bits=4).group_size_for(4096)
            (4096, 32)
        """
        if self.group_size is not None:
            return self.group_size
        if self.q_groups == 1:
            from ..kernels.quantize import default_group_size

            return default_group_size(in_features, self.num_bits)
        return max(1, in_features // self.q_groups)


@attrs.frozen
class QKVQuantConfig:
    """``quant.qkv``: whether q/k/v projections are quantized too."""

    enabled: bool = _field("quant.qkv.enabled")

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant.qkv")


@attrs.frozen
class HeadQuantConfig:
    """``quant.lm_head``: whether the output head is quantized too (off by default)."""

    enabled: bool = _field("quant.lm_head.enabled")

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant.lm_head")


@attrs.frozen
class CalibrationConfig:
    """``quant.calibration``: the calibration input of the calibrated methods (gptq, awq).

    Example:
        >>> CalibrationConfig().num_samples, CalibrationConfig().seq_len, CalibrationConfig().data is None
        (8, 512, True)
    """

    data: Any = _field("quant.calibration.data")
    num_samples: int = _field("quant.calibration.num_samples")
    seq_len: int = _field("quant.calibration.seq_len")
    seed: int = _field("quant.calibration.seed")
    tokenizer: Any = _field("quant.calibration.tokenizer")
    act_order: bool = _field("quant.calibration.act_order")
    gptq_grid: str = _field("quant.calibration.gptq_grid")
    damp: float = _field("quant.calibration.damp")

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant.calibration")


@attrs.frozen
class QuantizationConfig:
    """``quant``: weight quantization (off unless ``enabled`` or ``dtype="int8"``)."""

    enabled: bool = _field("quant.enabled")
    activation: ActivationQuantConfig = attrs.field(factory=ActivationQuantConfig)
    weight: WeightQuantConfig = attrs.field(factory=WeightQuantConfig)
    qkv: QKVQuantConfig = attrs.field(factory=QKVQuantConfig)
    lm_head: HeadQuantConfig = attrs.field(factory=HeadQuantConfig)
    checkpoint: Optional[str] = _field("quant.checkpoint")
    calibration: CalibrationConfig = attrs.field(factory=CalibrationConfig)

    def __attrs_post_init__(self) -> None:
        _validate(self, "quant")


@attrs.frozen
class CheckpointConfig:
    """``checkpoint_config`` (alias ``ckpt_config``): DeepSpeed's unused InferenceCheckpointConfig."""

    checkpoint_dir: Optional[str] = _field("checkpoint_config.checkpoint_dir")
    save_mp_checkpoint_path: Optional[str] = _field("checkpoint_config.save_mp_checkpoint_path")
    base_dir: Optional[str] = _field("checkpoint_config.base_dir")

    def __attrs_post_init__(self) -> None:
        _validate(self, "checkpoint_config")


@attrs.frozen
class InferenceConfig:
    """The whole inference configuration. Build it with :func:`policyinject.config.load_config`.

    See docs/config.md for every key, its aliases and its status.
    """

    replace_with_kernel_inject: bool = _field("replace_with_kernel_inject")
    dtype: str = _field("dtype")
    tensor_parallel: TensorParallelConfig = attrs.field(factory=TensorParallelConfig)
    enable_cuda_graph: bool = _field("enable_cuda_graph")
    use_triton: bool = _field("use_triton")
    triton_autotune: bool = _field("triton_autotune")
    zero: Mapping[str, Any] = _field("zero")
    triangular_masking: bool = _field("triangular_masking")
    moe: MoEConfig = attrs.field(factory=MoEConfig)
    keep_module_on_host: bool = _field("keep_module_on_host")
    quant: QuantizationConfig = attrs.field(factory=QuantizationConfig)
    checkpoint: Optional[Union[str, Mapping[str, Any]]] = _field("checkpoint")
    base_dir: str = _field("base_dir")
    set_empty_params: bool = _field("set_empty_params")
    save_mp_checkpoint_path: Optional[str] = _field("save_mp_checkpoint_path")
    checkpoint_config: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    return_tuple: bool = _field("return_tuple")
    training_mp_size: int = _field("training_mp_size")
    injection_policy: Optional[Mapping[Any, Any]] = _field("injection_policy")
    config: Any = _field("config")
    max_out_tokens: int = _field("max_out_tokens")
    min_out_tokens: int = _field("min_out_tokens")
    transposed_mode: bool = _field("transposed_mode")
    kernel_backend: str = _field("kernel_backend")
    max_batch_size: Optional[int] = _field("max_batch_size")
    cuda_graph_cache_size: int = _field("cuda_graph_cache_size")

    def __attrs_post_init__(self) -> None:
        problems = normalize_fields(self, "")
        if not problems:
            problems = check_section(self, "") + check_config(self)
        if problems:
            raise ConfigError(problems)
        if self.dtype == "int8" and not self.quant.enabled:
            object.__setattr__(self, "quant", attrs.evolve(self.quant, enabled=True))

    @property
    def quantization_requested(self) -> bool:
        """Whether weight quantization was asked for: ``quant.enabled`` (true for ``dtype="int8"`` too).

        ``quant.enabled`` defaults to false here (DeepSpeed's true is never read there), so it is the switch.

        Example:
            >>> InferenceConfig().quantization_requested, InferenceConfig(dtype="int8").quantization_requested
            (False, True)
        """
        return bool(self.quant.enabled)

    def to_dict(self) -> dict:
        """Canonical names and JSON values; ``load_config(cfg.to_dict()) == cfg`` for JSON-expressible configs.

        Live objects (process groups, ``mpu``, ``Policy`` values of ``injection_policy``, a model-config
        object) are left out; layer classes become their qualified names.

        Example:
            >>> d = InferenceConfig(dtype="half").to_dict()
            >>> d["dtype"], d["tensor_parallel"]["tp_size"], d["quant"]["weight"]["num_bits"]
            ('fp16', 1, 8)
        """
        from .converter import unstructure

        return unstructure(self)

    def resolve_dtype(self, model_dtype: torch.dtype, device: Union[str, torch.device],
                      bf16_supported: Optional[bool] = None) -> torch.dtype:
        """The compute dtype for a model (see :func:`policyinject.config.dtypes.resolve_dtype`).

        Example:
            >>> InferenceConfig().resolve_dtype(torch.float16, "cpu")
            torch.float16
        """
        return resolve_dtype(self.dtype, model_dtype, device, bf16_supported)


#: Section path -> attrs class (mirrors ``keys.SECTIONS``).
SECTION_CLASSES = MappingProxyType({
    "": InferenceConfig, "tensor_parallel": TensorParallelConfig, "moe": MoEConfig,
    "quant": QuantizationConfig, "quant.activation": ActivationQuantConfig, "quant.weight": WeightQuantConfig,
    "quant.qkv": QKVQuantConfig, "quant.lm_head": HeadQuantConfig, "quant.calibration": CalibrationConfig,
    "checkpoint_config": CheckpointConfig,
})
