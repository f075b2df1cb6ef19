"""The pass contract: every transformation plans first (no mutation), then applies its own actions.

A pass sees a :class:`PassContext`: the model, the parsed config, the resolved layers, the model-level
policy, the model config used for head counts, the target device, the tensor-parallel runtime information,
and the :class:`~policyinject.plan.Plan` whose typed fields passes read and write (the tensor-parallel
layout, the quantization and injection summaries, the decode description). ``plan`` returns actions and may
raise :class:`policyinject.errors.PlanError`; it must not mutate the model. ``apply`` performs exactly the
actions it planned, in order. ``enabled(config)`` is the one switch saying whether the config asks for it.

Example:
    >>> class Noop(Pass):
    ...     name = "noop"
    ...     def plan(self, ctx): return []
    ...     def apply(self, ctx, actions): pass
    >>> from policyinject.config import load_config
    >>> Noop.enabled(load_config(None))
    True
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import attrs
import torch

from ..plan import Plan
from ..policy.resolved import ResolvedLayer

__all__ = ["Pass", "PassContext", "ResolvedLayer", "owner_of"]


def owner_of(path: str, layer_paths: List[str]) -> str:
    """The resolved layer holding ``path`` (the longest layer path it is under), else ``path`` itself.

    Example:
        >>> owner_of("model.layers.1.mlp.up_proj", ["model.layers.0", "model.layers.1"]), owner_of("lm_head", [])
        ('model.layers.1', 'lm_head')
    """
    best = None
    for lp in layer_paths:
        if (path == lp or path.startswith(lp + ".") or not lp) and (best is None or len(lp) > len(best)):
            best = lp
    return path if best is None else best


@attrs.define
class PassContext:
    """What every pass sees. Lives for one ``init_inference`` call; nothing in it is process-global."""

    model: torch.nn.Module
    config: Any  # policyinject.InferenceConfig
    #: Layer instances with their resolved policies, in model order.
    layers: List[ResolvedLayer] = attrs.field(factory=list)
    #: The model-level policy, if one matched the model class.
    model_policy: Any = None
    #: The architecture config used for head counts (``config.config`` override, else ``model.config``).
    model_config: Any = None
    #: Target device for the model (``torch.device``).
    device: Optional[torch.device] = None
    #: AutoTP: embedding / head styles of the model's own Hugging Face plan (when no model policy matched).
    autotp_model_policy: Any = None
    #: Tensor-parallel runtime info (:class:`policyinject.distributed.TPInfo`), set by the tensor-parallel pass.
    tp: Any = None
    #: The plan being built: the typed fields passes share (``plan.tensor_parallel``, ``plan.quantize``, ...).
    plan: Plan = attrs.field(factory=Plan)
    #: The model has been moved to ``device`` (once, before the CUDA-graph pass or at the end).
    placed: bool = False
    #: The unit (layer path) a pass is building now; named by :class:`~policyinject.errors.ApplyError`.
    building: Optional[str] = None
    #: Checkpoint loading: linear path -> its quantize payload, quantized as soon as it is read (one linear of
    #: 16-bit weights alive at a time); the quantize pass then finds it quantized already.
    quantize_on_load: Dict[str, Any] = attrs.field(factory=dict)

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path) if path else self.model

    def replaced(self, path: str) -> None:
        """A pass swapped the layer at ``path``: point the resolved layer at the new module now, so the
        original (and the weights only it holds) is freed as apply goes, not after the last layer."""
        for i, m in enumerate(self.layers):
            if m.path == path:
                self.layers[i] = attrs.evolve(m, module=self.module(path))


class Pass:
    """Base class of the passes. Subclasses set ``name`` and implement ``plan`` and ``apply``."""

    name: str = "pass"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether ``config`` (an ``InferenceConfig``) asks for this pass: the one switch."""
        return True

    def plan(self, ctx: PassContext) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def check_can_apply(self, ctx: PassContext) -> None:
        """Raise (before any pass applies, the model untouched) when this pass cannot apply here; the default
        finds nothing."""

    def apply(self, ctx: PassContext, actions: list) -> None:  # pragma: no cover - interface
        raise NotImplementedError
