"""policyinject: describe an architecture once, declaratively; every inference optimisation follows.

The public API has two tiers (``docs/api.md``); everything else is internal and may change.

- **Users**: :func:`init_inference`, :class:`InferenceEngine`, :func:`plan_inference` and its :class:`Plan`,
  :func:`load_config` and the config classes, :class:`PolicyInjectError` and its subclasses.
- **Policy and plugin authors**: :class:`Policy`, :class:`ModelPolicy`, the specs and enums, :data:`hookimpl`,
  :class:`PluginManager`.

Example:
    >>> import torch, policyinject as pi
    >>> engine = pi.init_inference(torch.nn.Linear(4, 4), dtype="fp32")
    >>> isinstance(engine, pi.InferenceEngine)
    True
    >>> issubclass(pi.ConfigError, pi.PolicyInjectError) and issubclass(pi.PlanError, pi.PolicyInjectError)
    True
"""

from ._plugin_manager import PluginConflictWarning, PluginManager
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
)
from .engine import InferenceEngine
from .errors import (
    ApplyError,
    NothingInjectedWarning,
    NothingQuantizedWarning,
    PlanError,
    PluginError,
    PoisonedModelError,
    PolicyError,
    PolicyInjectError,
    RankTimeoutError,
    UnsupportedError,
)
from .hooks import hookimpl
from .pipeline import init_inference, plan_inference
from .plan import Plan
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

#: The user tier: make a model fast, look at the plan, configure, catch errors.
_USER_API = (
    "init_inference", "InferenceEngine", "plan_inference", "Plan", "load_config",
    "InferenceConfig", "TensorParallelConfig", "QuantizationConfig", "WeightQuantConfig", "ActivationQuantConfig",
    "QKVQuantConfig", "MoEConfig", "CheckpointConfig",
    "PolicyInjectError", "ConfigError", "PlanError", "PolicyError", "PluginError", "UnsupportedError",
    "RankTimeoutError", "ApplyError", "PoisonedModelError",
    "PluginConflictWarning", "NothingInjectedWarning", "NothingQuantizedWarning",
)
#: The policy-author tier: describe an architecture, ship it as a plugin.
_AUTHOR_API = (
    "Policy", "ModelPolicy", "AttentionSpec", "MLPSpec", "NormSpec",
    "Activation", "BlockKind", "NormKind", "QKVLayout", "Style", "hookimpl", "PluginManager",
)

__all__ = list(_USER_API + _AUTHOR_API)
