"""A resolved layer: one module instance, the policy that covers it, and how that policy was found.

Example:
    >>> import torch
    >>> from policyinject.policy import Policy
    >>> layer = ResolvedLayer("0", torch.nn.Linear(2, 2), Policy(torch.nn.Linear, styles={"": "row"}))
    >>> layer.resolved_by.value, layer.to_json()["class"]
    ('injection_policy', 'Linear')
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
import torch

__all__ = ["ResolvedBy", "ResolvedLayer"]


class ResolvedBy(str, enum.Enum):
    """Where a layer's policy came from, in order of precedence."""

    #: the ``injection_policy`` argument (a short form or a ``Policy``)
    USER = "injection_policy"
    #: ``tensor_parallel.tp_plan`` given as a mapping in the config
    TP_PLAN = "tp_plan"
    #: a plugin (built-in or entry point)
    PLUGIN = "plugin"
    #: AutoTP: the model's own Hugging Face plan (``_tp_plan`` / ``base_model_tp_plan``)
    HF_PLAN = "autotp:hf_plan"
    #: AutoTP: DeepSpeed-style name and structure heuristics
    HEURISTIC = "autotp:heuristic"

    @property
    def is_autotp(self) -> bool:
        return self in (ResolvedBy.HF_PLAN, ResolvedBy.HEURISTIC)


@attrs.define
class ResolvedLayer:
    """One module instance covered by a layer policy."""

    path: str
    module: torch.nn.Module = attrs.field(repr=False)
    policy: Any  # policyinject.policy.Policy
    resolved_by: ResolvedBy = attrs.field(default=ResolvedBy.USER, converter=ResolvedBy)

    def to_json(self) -> dict:
        return {"path": self.path, "class": type(self.module).__name__, "policy": self.policy.layer_name,
                "source": self.policy.source or "", "resolved_by": self.resolved_by.value}
