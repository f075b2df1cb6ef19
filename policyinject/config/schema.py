"""JSON Schema (draft 2020-12) of the configuration, generated from the attrs classes and the key registry.

Every canonical key is a property with its description, default and status (``x-status``); aliases and
deprecated keys are properties too (``deprecated: true`` for the latter). Except for keys where "auto" is
a real value, every key also accepts the string ``"auto"`` (meaning "use the default", as in DeepSpeed).

Example:
    >>> s = json_schema()
    >>> s["$schema"], s["properties"]["tp"]["description"].startswith("Alias of `tensor_parallel`")
    ('https://json-schema.org/draft/2020-12/schema', True)
    >>> s["properties"]["mp_size"]["deprecated"], s["$defs"]["TensorParallelConfig"]["properties"]["tp_size"]["default"]
    (True, 1)
"""

from __future__ import annotations

from typing import Any

import attrs

from .keys import Status, section_specs
from .model import SECTION_CLASSES
from .values import OMIT, jsonable

SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_AUTO = {"const": "auto", "description": 'Use the default (DeepSpeed\'s "auto").'}


def _describe(spec: Any) -> str:
    text = spec.meaning
    if spec.status is Status.WARNS:
        text += f" Status: warns (a non-default value is ignored with a UserWarning: {spec.note})."
    elif spec.status is Status.ERROR:
        text += f" Status: error (a non-default value is rejected: {spec.note})."
    elif spec.note:
        text += f" Note: {spec.note}."
    return text


def _value_schema(spec: Any) -> dict:
    if spec.section:
        ref = {"$ref": f"#/$defs/{spec.cls}"}
        inner = [{"type": "boolean"}, ref] if spec.bool_key else [ref]
        return {"anyOf": [*inner, _AUTO]}
    base = {k: v for k, v in spec.schema.items() if k != "description"}
    if spec.auto_value:
        return base
    return {"anyOf": [base, _AUTO]}


def _property(spec: Any) -> dict:
    prop = _value_schema(spec)
    prop["description"] = _describe(spec)
    if not spec.section:
        default = jsonable(spec.make_default())
        if default is not OMIT:
            prop["default"] = default
    prop["x-status"] = spec.status.value
    prop["x-origin"] = spec.origin
    if spec.status is Status.DEPRECATED:
        prop["deprecated"] = True
        prop["description"] = (
            f"Deprecated: moved to `{spec.new}` (DeprecationWarning)." if spec.new
            else f"Deprecated: ignored with a DeprecationWarning ({spec.note})."
        ) + f" {spec.meaning}"
    return prop


def _object(section: str) -> dict:
    properties: dict = {}
    for spec in section_specs(section):
        properties[spec.name] = _property(spec)
        for alias in spec.aliases:
            alias_prop = dict(properties[spec.name])
            alias_prop["description"] = f"Alias of `{spec.name}`; give one of them. " + alias_prop["description"]
            properties[alias] = alias_prop
    cls = SECTION_CLASSES[section]
    fields = [f.name for f in attrs.fields(cls)]
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0] + f" Canonical keys: {', '.join(fields)}.",
        "properties": properties,
        "additionalProperties": False,
    }


def json_schema() -> dict:
    """The JSON Schema of a config file / mapping accepted by ``load_config``.

    Example:
        >>> sorted(json_schema()["$defs"])[:2]
        ['ActivationQuantConfig', 'CalibrationConfig']
    """
    root = _object("")
    return {
        "$schema": SCHEMA_URI,
        "$id": "https://policyinject.invalid/schemas/inference-config.json",
        "title": "policyinject inference config",
        **root,
        "description": (
            "policyinject InferenceConfig (DeepSpeed-Inference compatible). Aliases name the same key as their "
            "canonical name (give one); deprecated keys are moved to their replacement with a "
            "DeprecationWarning; the string \"auto\" means \"use the default\" except for dtype, kernel_backend "
            "and tensor_parallel.tp_plan, where it is a value."
        ),
        "$defs": {cls.__name__: _object(section) for section, cls in SECTION_CLASSES.items() if section},
    }
