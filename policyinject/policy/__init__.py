"""Declarative policies: the one description of an architecture that every pass derives its work from."""

from .layout import qkv_rows
from .model import (
    Activation,
    AttentionSpec,
    BlockKind,
    MLPSpec,
    ModelPolicy,
    NormKind,
    NormSpec,
    Policy,
    QKNormScope,
    QKVLayout,
    Style,
    is_linear_like,
    read_size,
    read_value,
    resolve_qualified_name,
)
from .moe import ExpertsSpec, MoESpec, RouterSpec  # noqa: F401  (MoE vocabulary: policy/moe.py)

__all__ = [
    "Activation", "AttentionSpec", "BlockKind", "MLPSpec", "ModelPolicy", "NormKind", "NormSpec", "Policy",
    "QKNormScope", "QKVLayout", "Style", "is_linear_like", "qkv_rows", "read_size", "read_value",
    "resolve_qualified_name",
]
