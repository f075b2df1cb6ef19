"""The inference configuration: DeepSpeed-Inference's vocabulary, validated up front.

``load_config(config=None, **kwargs)`` accepts None, a mapping, a ``.json``/``.yaml`` path or an
:class:`InferenceConfig`, resolves aliases and deprecated keys, validates everything and raises one
:class:`ConfigError` listing every problem. See docs/config.md for every key.

Example:
    >>> from policyinject.config import load_config
    >>> cfg = load_config({"tp": {"tp_size": 2}, "dtype": "bfloat16"})
    >>> cfg.tensor_parallel.tp_size, cfg.dtype
    (2, 'bf16')
"""

from .dtypes import DTYPE_NAMES, normalize_dtype, resolve_dtype, torch_dtype
from .class_ref import ClassRef
from .errors import ConfigError, ConfigWarning, Problem
from .fingerprint import PER_RANK_KEYS, config_fingerprint, config_values, diff_fingerprints
from .keys import KEYS, KeySpec, Status
from .loader import LoadResult, load_config, parse_config, read_config_file
from .model import (
    ActivationQuantConfig,
    CheckpointConfig,
    InferenceConfig,
    MoEConfig,
    CalibrationConfig,
    HeadQuantConfig,
    QKVQuantConfig,
    QuantizationConfig,
    TensorParallelConfig,
    WeightQuantConfig,
)
from .schema import json_schema
from .tp_plan import HF_TP_STYLES

__all__ = [
    "ActivationQuantConfig", "CalibrationConfig", "CheckpointConfig", "ClassRef", "ConfigError", "ConfigWarning",
    "DTYPE_NAMES", "HF_TP_STYLES", "HeadQuantConfig", "InferenceConfig", "KEYS", "KeySpec", "LoadResult", "MoEConfig",
    "Problem", "QKVQuantConfig",
    "QuantizationConfig", "Status", "TensorParallelConfig", "WeightQuantConfig", "json_schema", "load_config",
    "PER_RANK_KEYS", "config_fingerprint", "config_values", "diff_fingerprints", "normalize_dtype", "parse_config", "read_config_file", "resolve_dtype", "torch_dtype",
]
