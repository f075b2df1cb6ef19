"""``InferenceEngine``: the transformed model, its plan and its report.

Calling the engine runs the model's forward; ``generate`` uses the engine's own decode loop (static KV
cache, CUDA graphs) when the decode engine supports the model, and the model's own ``generate``
otherwise.

Example:
    >>> import torch, policyinject as pi
    >>> engine = pi.init_inference(torch.nn.Linear(3, 2), dtype="fp32")
    >>> engine(torch.ones(1, 3)).shape
    torch.Size([1, 2])
    >>> engine.report["parameter_bytes"]
    32
"""

from __future__ import annotations

from typing import Any

import torch

from .decode.concurrency import CallLock
from .plan import Plan


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and persistent buffers (quantized weights and scales counted as stored).

    Non-persistent buffers (rotary tables, masks) are not weights and are left out; tied weights count once.

    Example:
        >>> parameter_bytes(torch.nn.Linear(2, 2, bias=False))
        16
    """
    seen: set = set()
    total = 0
    tensors = list(model.parameters())
    for module in model.modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        tensors.extend(b for name, b in module.named_buffers(recurse=False) if name not in skip)
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)  # tied weights share storage
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class InferenceEngine(torch.nn.Module):
    """Wraps the transformed model. ``engine.module`` is the model itself (transformed in place)."""

    def __init__(self, module: torch.nn.Module, config: Any, plan: Plan) -> None:
        super().__init__()
        self.module = module
        self.config = config
        self.plan = plan
        self._decoder = None
        self._generate_lock = CallLock()  # one generate at a time on this engine (shared cache and state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model's forward (under ``torch.inference_mode``)."""
        with torch.inference_mode():
            return self.module(*args, **kwargs)

    @property
    def report(self) -> dict:
        """What the passes did: parameter bytes, the summary (with timings), the plan's typed fields
        (``dtype``, ``tensor_parallel``, ``quantize``, ``injection``, ``decode``, each present when its pass
        ran) as JSON, and lint."""
        fields = self.plan.fields_json()
        fields.pop("layers", None)
        return {
            "parameter_bytes": parameter_bytes(self.module),
            "summary": dict(self.plan.summary),
            **fields,
            "lint": list(self.plan.lint),
        }

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    def save_quantized(self, path: Any) -> None:
        """Write the quantized weights to a safetensors file: :func:`policyinject.quant.save_quantized`."""
        from .quant.checkpoint import save_quantized

        save_quantized(self.module, path)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate tokens; Hugging Face ``generate`` keyword names.

        Uses the engine's decode loop when the model is supported by it, else the model's ``generate``.
        Thread-safe: concurrent calls on one engine run one at a time (a lock owned by the engine), so each
        returns what it would have returned alone.
        """
        with self._generate_lock:
            decoder = self._get_decoder()
            if decoder is not None:
                return decoder.generate(*args, **kwargs)
            generate = getattr(self.module, "generate", None)
            if generate is None:
                raise TypeError(f"{type(self.module).__name__} has no generate(); call the engine for a forward pass")
            with torch.inference_mode():
                return generate(*args, **kwargs)

    def _get_decoder(self) -> Any:
        """The decoder ``plan.decode`` describes (built once), or None."""
        if self._decoder is None and self.plan.decode is not None:
            from .decode.generate import build_decoder

            self._decoder = build_decoder(self.module, self.plan)
        return self._decoder

    def extra_repr(self) -> str:
        return f"actions={len(self.plan)}, lint={len(self.plan.lint)}"
