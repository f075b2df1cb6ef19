"""The plan: what will happen to each module, computed before anything is mutated.

Each pass contributes :class:`Action` rows during planning; the pipeline then applies them pass by pass.
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
from typing import Any, Iterable, Iterator, Mapping

import attrs


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@attrs.frozen
class Action:
    """One planned change to one module.

    ``details`` must be JSON-able (ints, strings, lists); a pass keeps whatever it needs to apply the
    action in ``payload``, which is neither printed nor serialised.
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
    """Ordered actions of every pass, plus lint findings and a summary of what each pass measured."""

    actions: list = attrs.field(factory=list)
    lint: list = attrs.field(factory=list)
    summary: dict = attrs.field(factory=dict)

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

    def to_json(self) -> dict:
        return {
            "actions": [a.to_json() for a in self.actions],
            "lint": list(self.lint),
            "summary": _jsonable(self.summary),
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
