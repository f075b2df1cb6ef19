"""The key table of docs/config.md, rendered from the key registry (``policyinject config table``).

Example:
    >>> table = render_key_table()
    >>> table.splitlines()[0]
    '| key | type | default | aliases | status | meaning and notes |'
    >>> any(line.startswith("| `tensor_parallel.tp_size` |") for line in table.splitlines())
    True
"""

from __future__ import annotations

import json
from typing import Any

from .keys import KEYS, Status
from .values import OMIT, jsonable

#: Markers around the generated table inside docs/config.md.
BEGIN = "<!-- BEGIN GENERATED KEY TABLE (policyinject config table) -->"
END = "<!-- END GENERATED KEY TABLE -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(spec: Any) -> str:
    if spec.section:
        return "–"
    value = jsonable(spec.make_default())
    return "–" if value is OMIT else f"`{json.dumps(value)}`"


def _status(spec: Any) -> str:
    if spec.status is Status.DEPRECATED:
        return f"deprecated → `{spec.new}`" if spec.new else "deprecated (dropped)"
    return spec.status.value


def _notes(spec: Any) -> str:
    text = spec.meaning + (" *(policyinject key)*" if spec.origin == "policyinject" else "")
    if spec.status is Status.WARNS:
        return f"{text} **A non-default value is ignored with a UserWarning:** {spec.note}."
    if spec.status is Status.ERROR:
        return f"{text} **A non-default value is a ConfigError:** {spec.note}."
    if spec.status is Status.DEPRECATED:
        return f"{text} DeprecationWarning" + ("; giving it with its replacement is a ConfigError." if spec.new
                                                else f": {spec.note}.")
    return f"{text} {spec.note}" if spec.note else text


def render_key_table() -> str:
    """One Markdown row per key (canonical dotted path), in registry order."""
    lines = ["| key | type | default | aliases | status | meaning and notes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for spec in KEYS:
        aliases = ", ".join(f"`{a}`" for a in spec.aliases) or "–"
        lines.append(
            f"| `{spec.path}` | {_cell(spec.type)} | {_cell(_default(spec))} | {aliases} | "
            f"{_cell(_status(spec))} | {_cell(_notes(spec))} |"
        )
    return "\n".join(lines)


def render_block() -> str:
    """The table between its markers, as docs/config.md holds it.

    Example:
        >>> render_block().startswith(BEGIN) and render_block().endswith(END)
        True
    """
    return f"{BEGIN}\n{render_key_table()}\n{END}"
