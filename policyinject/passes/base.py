"""The pass contract: every transformation plans first (no mutation), then applies its own actions.

A pass sees a :class:`PassContext`: the model, the parsed config, the policies matched to module paths,
the model config used for head counts, and the per-run tensor-parallel information. ``plan`` returns
actions and may raise :class:`policyinject.errors.PlanError`; it must not mutate the model. ``apply``
performs exactly the actions it planned, in order.

Example:
    >>> class Noop(Pass):
    ...     name = "noop"
    ...     def plan(self, ctx): return []
    ...     def apply(self, ctx, actions): pass
    >>> Noop().enabled(None)
    True
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch


@attrs.define
class MatchedLayer:
    """One module instance covered by a layer policy."""

    path: str
    module: torch.nn.Module
    policy: Any  # policyinject.policy.Policy


@attrs.define
class PassContext:
    """What every pass sees. Lives for one ``init_inference`` call; nothing in it is process-global."""

    model: torch.nn.Module
    config: Any  # policyinject.InferenceConfig
    #: Layer instances matched to policies, in model order.
    layers: list = attrs.field(factory=list)
    #: The model-level policy, if one matched the model class.
    model_policy: Any = None
    #: The architecture config used for head counts (``config.config`` override, else ``model.config``).
    model_config: Any = None
    #: Target device for the model (``torch.device``).
    device: Optional[torch.device] = None
    #: Tensor-parallel runtime info (rank, world size, group), set by the tensor-parallel pass.
    tp: Any = None
    #: Free-form notes a pass leaves for later passes (e.g. which linears were sharded).
    notes: dict = attrs.field(factory=dict)

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path) if path else self.model


class Pass:
    """Base class of the passes. Subclasses set ``name`` and implement ``plan`` and ``apply``."""

    name: str = "pass"

    def enabled(self, config: Any) -> bool:
        """Whether this pass has anything to do under ``config``."""
        return True

    def plan(self, ctx: PassContext) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, ctx: PassContext, actions: list) -> None:  # pragma: no cover - interface
        raise NotImplementedError
