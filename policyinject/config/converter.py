"""The one cattrs converter: canonical nested mapping <-> attrs classes, collecting every problem.

Structuring uses the registry's converter for each leaf field (per-field ``override(struct_hook=...)``),
with detailed validation so that every bad field of every section is found in one pass. Problems found by a
class's own validators (raised as ``ConfigError`` from ``__attrs_post_init__``) are gathered too; the bad
keys are then dropped and structuring is retried, so that rules between sections still run and all problems
come back together. Unstructuring uses the registry's dumpers (``to_dict``).

Input here is already canonical (aliases and deprecated keys are resolved by ``normalize.py``); problem
paths are canonical and dotted.

Example:
    >>> cfg, problems = structure_config({"tensor_parallel": {"tp_size": 2}, "dtype": "half"})
    >>> cfg.tensor_parallel.tp_size, cfg.dtype, problems
    (2, 'fp16', [])
    >>> cfg, problems = structure_config({"tensor_parallel": {"tp_size": 0}, "max_out_tokens": 1.5})
    >>> cfg is None, [str(p) for p in problems]
    (True, ['tensor_parallel.tp_size: must be >= 1, got 0', 'max_out_tokens: expected an integer, got 1.5 (float)'])
"""

from __future__ import annotations

import re
from typing import Any, Optional

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .errors import ConfigError, InvalidValue, Problem
from .inputs import safe_text
from .keys import SPECS
from .model import SECTION_CLASSES, InferenceConfig
from .values import OMIT

_SECTION_OF = {cls: section for section, cls in SECTION_CLASSES.items()}


def _struct_hook(convert):
    return lambda value, _type: convert(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    # Innermost sections first, so that a parent's generated function picks up its children's hooks.
    for section, cls in sorted(SECTION_CLASSES.items(), key=lambda kv: -kv[0].count(".") - bool(kv[0])):
        overrides = {}
        unstruct = {}
        for field in attrs.fields(cls):
            spec = SPECS[f"{section}.{field.name}" if section else field.name]
            if not spec.section:
                overrides[field.name] = override(struct_hook=_struct_hook(spec.convert))
                unstruct[field.name] = override(unstruct_hook=spec.dump)
        conv.register_structure_hook(cls, make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True, **overrides))
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, **unstruct))
    return conv


#: Built once at import and never modified afterwards.
CONVERTER = _make_converter()


def _qualify(message: str, section: str) -> str:
    """Turn backticked sibling names of a section's message into full canonical paths."""
    def full(m: "re.Match") -> str:
        path = f"{section}.{m.group(1)}" if section else m.group(1)
        return f"`{path}`" if path in SPECS else m.group(0)

    return re.sub(r"`([^`]+)`", full, message)


def _leaf_problems(exc: BaseException, path: tuple) -> list:
    prefix = ".".join(path)
    if isinstance(exc, InvalidValue):
        return [Problem(prefix + sub, message) for sub, message in exc.problems]
    if isinstance(exc, ConfigError):
        return [Problem(f"{prefix}.{p.path}" if prefix and p.path else (prefix or p.path), _qualify(p.message, prefix))
                for p in exc.problems]
    sub = getattr(exc, "exceptions", None)
    if sub:  # a cattrs exception group: descend, following the attribute notes
        out = []
        for e in sub:
            names = [n.name for n in getattr(e, "__notes__", ()) if isinstance(n, AttributeValidationNote)]
            out.extend(_leaf_problems(e, path + tuple(names)))
        return out
    return [Problem(prefix, f"invalid value ({type(exc).__name__}: {safe_text(exc)})")]


def _strip_path(path: str) -> str:
    return path.split("[", 1)[0]


def _drop(tree: dict, path: str) -> bool:
    """Remove the key at canonical ``path`` (or its nearest present ancestor) from ``tree``; True if removed."""
    parts = _strip_path(path).split(".") if path else []
    node = tree
    trail = []
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            break
        trail.append((node, part))
        node = node[part]
    if not trail:
        return False
    parent, key = trail[-1]
    del parent[key]
    return True


def structure_config(tree: dict) -> "tuple[Optional[InferenceConfig], list]":
    """Build an :class:`InferenceConfig` from a canonical nested mapping; return ``(config, problems)``.

    ``config`` is None when there are problems. Never raises for bad values.
    """
    tree = _deep_dict_copy(tree)
    problems: list = []
    for _ in range(8):
        try:
            cfg = CONVERTER.structure(tree, InferenceConfig)
        except ConfigError as e:  # the top-level rules: nothing left to retry
            problems.extend(_leaf_problems(e, ()))
            break
        except cattrs.BaseValidationError as e:
            found = _leaf_problems(e, ())
            problems.extend(found)
            if not any([_drop(tree, p.path) for p in found]):
                break
            continue
        except Exception as e:  # defensive: a user object misbehaving in a comparison, say
            problems.append(Problem("", f"invalid configuration ({type(e).__name__}: {safe_text(e)})"))
            break
        else:
            if not problems:
                return cfg, []
            break
    return None, list(dict.fromkeys(problems))  # order kept, duplicates dropped, linear time


def _deep_dict_copy(tree: Any) -> Any:
    """Copy the nested *section* dicts (values are shared, not copied)."""
    if isinstance(tree, dict):
        return {k: _deep_dict_copy(v) if isinstance(v, dict) and k in _SECTION_KEYS else v for k, v in tree.items()}
    return tree


_SECTION_KEYS = frozenset(p.rsplit(".", 1)[-1] for p in SECTION_CLASSES if p)


def unstructure(cfg: Any) -> dict:
    """The JSON form of a config object (``InferenceConfig.to_dict``), without omitted live objects.

    Example:
        >>> unstructure(InferenceConfig())["moe"]["moe_experts"]
        [1]
    """
    return _strip(CONVERTER.unstructure(cfg))


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not OMIT}
    return value
