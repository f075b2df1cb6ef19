"""The typed facts passes hand to each other through the :class:`~policyinject.plan.Plan`.

Nothing travels between passes in string-keyed dicts: the tensor-parallel pass records its layout (this
rank's head counts per layer and the local ``(out, in)`` shape of every linear it splits), which the
quantize and kernel-injection passes read; quantization and injection record what they did; the
kernel-injection and CUDA-graph passes describe the decoder the engine builds for ``generate``.

Example:
    >>> layout = TensorParallelLayout(tp_size=2, rank=0, grain=8)
    >>> layout.local_shapes["layers.0.fc1"] = (16, 8)
    >>> layout.local_shape("layers.0.fc1", (32, 8)), layout.local_shape("layers.0.fc2", (8, 32))
    ((16, 8), (8, 32))
    >>> layout.to_json()["local_shapes"]
    {'layers.0.fc1': [16, 8]}
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs

__all__ = ["LocalHeads", "TensorParallelLayout", "QuantizeSummary", "InjectedLayerInfo", "InjectionSummary",
           "DecodeDescription", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` with mappings, sequences and attrs instances turned into JSON types (others: ``str``).

    Example:
        >>> jsonable({"a": (1, 2), "b": LocalHeads(2, 1)})
        {'a': [1, 2], 'b': {'heads': 2, 'kv_heads': 1}}
    """
    if attrs.has(type(value)):
        return {f.name: jsonable(getattr(value, f.name)) for f in attrs.fields(type(value)) if f.repr}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class _Json:
    def to_json(self) -> dict:
        return jsonable(self)


@attrs.frozen
class LocalHeads(_Json):
    """This rank's attention head counts of one layer."""

    heads: int
    kv_heads: int


@attrs.define
class TensorParallelLayout(_Json):
    """What the tensor-parallel pass decided for this rank (written while planning, read by later passes).

    ``local_shapes`` holds the local ``(out, in)`` of every linear the pass splits (replicated linears are
    absent: their shape is the global one), ``heads`` this rank's head counts per layer path.
    """

    tp_size: int
    rank: int
    grain: int
    heads: Dict[str, LocalHeads] = attrs.field(factory=dict)
    local_shapes: Dict[str, Tuple[int, int]] = attrs.field(factory=dict)
    #: Written by apply when weights were read from a checkpoint: bytes, files, seconds, peak memory.
    load: Optional[Dict[str, Any]] = None

    def local_shape(self, path: str, global_shape: Tuple[int, int]) -> Tuple[int, int]:
        """The local ``(out, in)`` of the linear at ``path`` (its global shape when not split)."""
        shape = self.local_shapes.get(path)
        return (int(shape[0]), int(shape[1])) if shape is not None else (int(global_shape[0]), int(global_shape[1]))


@attrs.define
class QuantizeSummary(_Json):
    """Weight quantization: planned figures (``planned=True``), replaced by measured ones after apply."""

    linears: int
    bits: int
    model_bytes_before: int
    model_bytes_after: int
    linear_bytes_before: int = 0
    linear_bytes_after: int = 0
    planned: bool = True
    #: Paths of the linears quantized (planned), in model order.
    quantized: Tuple[str, ...] = ()
    #: Every other linear of the model: path -> why it is not quantized.
    skipped: Dict[str, str] = attrs.field(factory=dict)
    #: The ``quant.weight.include`` / ``exclude`` patterns the selection used (None: not given).
    include: Optional[Tuple[str, ...]] = None
    exclude: Optional[Tuple[str, ...]] = None

    def selection_fields(self) -> dict:
        """What was selected and why (carried from the planned summary to the measured one)."""
        return {"quantized": self.quantized, "skipped": dict(self.skipped), "include": self.include,
                "exclude": self.exclude}

    def skip_reasons(self) -> Dict[str, int]:
        """How many linears were skipped for each reason.

        Example:
            >>> QuantizeSummary(0, 8, 1, 1, skipped={"a": "x", "b": "x", "c": "y"}).skip_reasons()
            {'x': 2, 'y': 1}
        """
        out: Dict[str, int] = {}
        for reason in self.skipped.values():
            out[reason] = out.get(reason, 0) + 1
        return out

    @property
    def ratio(self) -> float:
        return self.model_bytes_after / self.model_bytes_before if self.model_bytes_before else 1.0

    def to_json(self) -> dict:
        return {**jsonable(self), "ratio": self.ratio}

    def describe(self) -> str:
        """One line for the plan summary."""
        linear = self.linear_bytes_after / max(self.linear_bytes_before, 1)
        return (f"{self.model_bytes_before / 2**30:.3f} GiB -> {self.model_bytes_after / 2**30:.3f} GiB "
                f"({self.ratio:.2f}x; the {self.linears} quantized linears {linear:.2f}x at {self.bits} bits)")

    def describe_skipped(self) -> str:
        """One line: the linears not quantized, counted by reason (``-`` for none)."""
        return "; ".join(f"{n} x {r}" for r, n in self.skip_reasons().items()) or "-"


@attrs.frozen
class InjectedLayerInfo(_Json):
    """One layer replaced by an ``InjectedBlock``: the head geometry it was built with and its wiring."""

    heads: int
    kv_heads: int
    head_dim: int
    kind: str


@attrs.define
class InjectionSummary(_Json):
    """What kernel injection replaced (written by its apply)."""

    blocks: Dict[str, InjectedLayerInfo] = attrs.field(factory=dict)
    #: layer path -> layer-relative paths of the submodules replaced (submodule-level injection)
    submodules: Dict[str, List[str]] = attrs.field(factory=dict)
    decode_gemv_linears: int = 0


@attrs.frozen
class DecodeDescription(_Json):
    """How ``InferenceEngine.generate`` decodes: the engine's decoder (when ``problems`` is empty), built
    from this description and the plan's model policy, else the model's own ``generate``.

    ``when_unsupported``: ``"raise"`` (the ``cuda_graph`` pass: an unsupported model is an error) or
    ``"fallback"`` (the ``kernel_inject`` pass: the model's own ``generate`` is used). ``problems``: why the
    decode engine cannot run the transformed model (checked after apply).
    """

    use_graphs: bool
    when_unsupported: str = "fallback"
    max_len: int = 1024
    batch_capacity: Optional[int] = None
    graph_cache_size: int = 8
    backend: str = "auto"
    problems: Tuple[str, ...] = ()

    @property
    def supported(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**jsonable(self), "supported": self.supported}
