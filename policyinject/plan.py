"""The plan: what will happen to each module, computed before anything is mutated.

Each pass contributes :class:`Action` rows during planning; the pipeline then applies them pass by pass.
Besides the actions, a plan holds the typed facts passes hand to each other (the contract between passes,
:mod:`policyinject.plan_fields`): the resolved layers, the float dtype, the tensor-parallel layout, the
quantization and injection summaries and the decode description the engine builds its decoder from.
A plan prints as a table and serialises to JSON, so ``policyinject inspect`` can show it without touching
the model, and lint findings (rules that matched nothing, linears no rule covers, layer classes no policy
covers) travel with it.

Example:
    >>> plan = Plan()
    >>> plan.add(Action("dtype", "model", "LlamaForCausalLM", "cast", {"dtype": "bf16"}))
    >>> plan.warn("no policy covers layer class Foo (2 instances)")
    >>> print(plan.to_table())  # doctest: +NORMALIZE_WHITESPACE
    pass   module  class             action  details
    dtype  model   LlamaForCausalLM  cast    dtype=bf16
    <BLANKLINE>
    lint: no policy covers layer class Foo (2 instances)
    >>> plan.to_json()["actions"][0]["action"]
    'cast'
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Mapping, Optional

import attrs

from .plan_fields import DecodeDescription, InjectionSummary, QuantizeSummary, TensorParallelLayout, jsonable


_jsonable = jsonable


@attrs.frozen
class Action:
    """One planned change to one module.

    ``details`` must be JSON-able (ints, strings, lists); a pass keeps whatever it needs to apply the
    action in ``payload`` (an attrs instance of the pass's own payload class), which is neither printed nor
    serialised.
    """

    pass_name: str
    path: str
    module_class: str
    action: str
    details: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    payload: Any = attrs.field(default=None, eq=False, repr=False)

    def to_json(self) -> dict:
        return {
            "pass": self.pass_name,
            "module": self.path,
            "class": self.module_class,
            "action": self.action,
            "details": _jsonable(self.details),
        }


@attrs.define
class Plan:
    """Ordered actions of every pass, lint findings, a summary, and the typed fields passes share.

    ========================  ==================================  ===========================================
    field                     written by                          read by
    ========================  ==================================  ===========================================
    ``layers``                policy resolution (before passes)   every pass, ``inspect``
    ``model_policy``          policy resolution                   tensor_parallel, kernel_inject, decoder
    ``dtype``                 dtype pass (plan)                   quantize (bytes per element)
    ``tensor_parallel``       tensor_parallel pass (plan, apply)  quantize, kernel_inject (local shapes, heads)
    ``quantize``              quantize pass (plan, apply)         summary, ``engine.report``
    ``injection``             kernel_inject pass (apply)          ``engine.report``
    ``decode``                kernel_inject / cuda_graph passes   ``InferenceEngine.generate``
    ========================  ==================================  ===========================================
    """

    actions: list = attrs.field(factory=list)
    lint: list = attrs.field(factory=list)
    summary: dict = attrs.field(factory=dict)
    #: Every layer a policy covers (:class:`policyinject.policy.resolve.ResolvedLayer`), in model order.
    layers: list = attrs.field(factory=list)
    #: The model-level policy, if one matched the model class.
    model_policy: Any = None
    #: The architecture config used for head counts (``config.config`` override, else ``model.config``).
    model_config: Any = attrs.field(default=None, repr=False)
    #: The float dtype parameters end up in (a ``torch.dtype``).
    dtype: Any = None
    tensor_parallel: Optional[TensorParallelLayout] = None
    quantize: Optional[QuantizeSummary] = None
    injection: Optional[InjectionSummary] = None
    decode: Optional[DecodeDescription] = None

    def add(self, action: Action) -> None:
        self.actions.append(action)

    def extend(self, actions: Iterable[Action]) -> None:
        self.actions.extend(actions)

    def warn(self, message: str) -> None:
        self.lint.append(message)

    def for_pass(self, pass_name: str) -> list:
        return [a for a in self.actions if a.pass_name == pass_name]

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def fields_json(self) -> dict:
        """The typed fields (resolved layers, dtype, TP layout, summaries, decode description) as JSON."""
        out: dict = {"layers": [layer.to_json() for layer in self.layers]}
        if self.model_policy is not None:
            out["model_policy"] = f"{self.model_policy.model_name} ({self.model_policy.source})"
        if self.dtype is not None:
            out["dtype"] = str(self.dtype).replace("torch.", "")
        for name in ("tensor_parallel", "quantize", "injection", "decode"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to_json()
        return out

    def to_json(self) -> dict:
        return {
            "actions": [a.to_json() for a in self.actions],
            "lint": list(self.lint),
            "summary": _jsonable(self.summary),
            **self.fields_json(),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def to_table(self, max_rows: int | None = None) -> str:
        """A fixed-width table: pass, module path, class, action, details."""
        header = ("pass", "module", "class", "action", "details")
        rows = [header]
        actions = self.actions if max_rows is None else self.actions[:max_rows]
        for a in actions:
            details = " ".join(f"{k}={_fmt(v)}" for k, v in a.details.items())
            rows.append((a.pass_name, a.path or "(model)", a.module_class, a.action, details))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines = [line.rstrip() for line in lines]
        if max_rows is not None and len(self.actions) > max_rows:
            lines.append(f"... {len(self.actions) - max_rows} more actions (use --json for all)")
        if self.summary:
            lines.append("")
            lines.extend(f"{k}: {_fmt(v)}" for k, v in self.summary.items())
        if self.lint:
            lines.append("")
            lines.extend(f"lint: {m}" for m in self.lint)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
