"""policyinject: describe an architecture once, declaratively; every inference optimisation follows.

Example:
    >>> import torch, policyinject as pi
    >>> engine = pi.init_inference(torch.nn.Linear(4, 4), dtype="fp32")
    >>> isinstance(engine, pi.InferenceEngine)
    True
"""

from .config import (
    ActivationQuantConfig,
    CheckpointConfig,
    ConfigError,
    InferenceConfig,
    MoEConfig,
    QKVQuantConfig,
    QuantizationConfig,
    TensorParallelConfig,
    WeightQuantConfig,
    load_config,
    parse_config,
)
from .engine import InferenceEngine
from .errors import PlanError, PluginError, PolicyError, UnsupportedError
from .hooks import hookimpl, hookspec
from .pipeline import init_inference, plan_inference
from .plan import Action, Plan
from .plugins import PluginManager
from .policy import (
    Activation,
    AttentionSpec,
    BlockKind,
    MLPSpec,
    ModelPolicy,
    NormKind,
    NormSpec,
    Policy,
    QKVLayout,
    Style,
)

__version__ = "0.1.0"

__all__ = [
    "Action", "ActivationQuantConfig", "Activation", "AttentionSpec", "BlockKind", "CheckpointConfig", "ConfigError", "InferenceConfig",
    "InferenceEngine", "MLPSpec", "ModelPolicy", "MoEConfig", "NormKind", "NormSpec", "Plan", "PlanError",
    "PluginError", "PluginManager", "Policy", "PolicyError", "QKVLayout", "QKVQuantConfig", "QuantizationConfig", "Style",
    "TensorParallelConfig", "UnsupportedError", "hookimpl", "hookspec", "init_inference", "load_config",
    "parse_config", "plan_inference", "WeightQuantConfig",
]
