"""From what the user wrote to canonical settings: aliases, deprecated keys, "auto", unknown keys.

:func:`normalize` walks one source (a config mapping or the keyword arguments) with the key registry and
returns a :class:`Normalized`: one :class:`Setting` per leaf key given, under its canonical dotted path and
remembering how the user spelled it, plus the problems and warnings found. The source is first copied into
plain data by :func:`policyinject.config.inputs.plain_copy` (bounded depth and size, no cycles, no user
methods run afterwards). Values are not checked here
(the converter does that); only the shape of the mapping is.

Rules (DeepSpeed's, except where noted):

- an alias (``tp``, ``kernel_inject``, ...) is the same key as its canonical name; giving both is an error;
- a deprecated key moves to its new home with a ``DeprecationWarning``; giving it together with its
  replacement is an error (DeepSpeed raises AssertionError); ``replace_method`` only warns;
- the value ``"auto"`` means "use the default", except for keys where "auto" is a real value
  (``dtype``, ``kernel_backend``, ``tensor_parallel.tp_plan``);
- ``moe: true/false`` sets ``moe.enabled``;
- an unknown key is an error with the closest valid spelling suggested.

Example:
    >>> n = normalize({"tp": {"tp_size": 2}, "kernel_inject": True, "max_tokens": "auto"})
    >>> {p: (s.value, s.spelled) for p, s in n.settings.items()}
    {'tensor_parallel.tp_size': (2, 'tp.tp_size'), 'replace_with_kernel_inject': (True, 'kernel_inject')}
    >>> [str(p) for p in normalize({"tensor_paralel": {}}).problems]
    ['tensor_paralel: unknown key `tensor_paralel`; did you mean `tensor_parallel`?']
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import attrs

from .errors import ConfigWarning, Problem, short_repr
from .inputs import bounded_repr, plain_copy
from .keys import NAMES, SPECS, Status, lookup, section_specs


@attrs.frozen
class Setting:
    """One leaf key as given: canonical path, value as written, spelling, and whether it came deprecated."""

    path: str
    value: Any
    spelled: str
    deprecated: bool = False


@attrs.define
class Normalized:
    """The result of normalising one source."""

    settings: dict = attrs.field(factory=dict)
    #: Canonical path (leaf or section) -> the user's spelling of it.
    spellings: dict = attrs.field(factory=dict)
    problems: list = attrs.field(factory=list)
    warnings: list = attrs.field(factory=list)
    #: How many unknown keys were found (only the first ``MAX_HINTS`` get a did-you-mean hint).
    unknown: int = 0


def _is_mapping(value: Any) -> bool:
    return type(value) is dict  # after plain_copy every mapping the user gave is a plain dict


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


#: Leaf name -> the canonical paths that end with it (for "the right name in the wrong section" hints).
_BY_LEAF: dict = {}
for _path in SPECS:
    _BY_LEAF.setdefault(_path.rsplit(".", 1)[-1], []).append(_path)

#: Unknown keys of one source that get a did-you-mean hint; past that only the key is named (bounded cost).
MAX_HINTS = 100


def _unknown(section: str, key: str, spelled: str, hint_wanted: bool = True) -> Problem:
    shown = bounded_repr(key, 80)[1:-1] if len(key) > 80 else key
    if not hint_wanted or len(key) > 80:
        return Problem(spelled, f"unknown key `{shown}`")
    elsewhere = [p for p in _BY_LEAF.get(key, ()) if p != _join(section, key)]
    close = difflib.get_close_matches(key, list(NAMES[section]), n=1, cutoff=0.6)
    if len(elsewhere) == 1:  # the right name in the wrong section: tp_size at the top level
        hint = f"; did you mean `{elsewhere[0]}`?"
    elif close:
        hint = f"; did you mean `{close[0]}`?"
    elif elsewhere:
        hint = f"; did you mean one of {', '.join(f'`{p}`' for p in elsewhere)}?"
    else:
        hint = ""
    return Problem(spelled, f"unknown key `{key}`{hint}")


def _add(out: Normalized, setting: Setting) -> None:
    old = out.settings.get(setting.path)
    if old is None:
        out.settings[setting.path] = setting
        out.spellings[setting.path] = setting.spelled
        return
    if old.deprecated or setting.deprecated:
        dep, new = (old, setting) if old.deprecated else (setting, old)
        out.problems.append(Problem(
            dep.spelled,
            f"cannot give the deprecated `{dep.spelled}` together with its replacement `{new.spelled}`",
        ))
    else:
        out.problems.append(Problem(
            setting.spelled, f"`{old.spelled}` and `{setting.spelled}` are the same key; give it once"
        ))


def _walk(mapping: Any, section: str, prefix: str, out: Normalized) -> None:
    for key, value in list(mapping.items()):
        if type(key) is not str:
            out.problems.append(Problem(_join(prefix, bounded_repr(key, 40)), f"unknown key {short_repr(key)}: keys are strings"))
            continue
        spelled = _join(prefix, key)
        spec = lookup(section, key)
        if spec is None:
            out.unknown += 1
            out.problems.append(_unknown(section, key, spelled, out.unknown <= MAX_HINTS))
            continue
        if isinstance(value, str) and value == "auto" and not spec.auto_value:
            continue  # DeepSpeed's "auto" stripping: use the default
        if spec.section:
            _section(spec, value, spelled, out)
        elif spec.status is Status.DEPRECATED:
            if spec.new:
                out.warnings.append(ConfigWarning(
                    DeprecationWarning, spelled,
                    f"`{spelled}` is deprecated; use `{spec.new}` instead (its value was moved there)",
                ))
                _add(out, Setting(spec.new, value, spelled, deprecated=True))
            else:
                out.warnings.append(ConfigWarning(
                    DeprecationWarning, spelled, f"`{spelled}` is deprecated and ignored: {spec.note}"
                ))
        elif not spec.field:
            if value is not None:
                out.warnings.append(ConfigWarning(UserWarning, spelled, f"`{spelled}` is ignored here: {spec.note}"))
        else:
            _add(out, Setting(spec.path, value, spelled))


def _section(spec: Any, value: Any, spelled: str, out: Normalized) -> None:
    claimed = out.spellings.get(spec.path)
    if claimed is not None and claimed != spelled:
        out.problems.append(Problem(spelled, f"`{claimed}` and `{spelled}` are the same key; give it once"))
        return
    out.spellings[spec.path] = spelled
    if spec.bool_key and isinstance(value, bool):
        _add(out, Setting(f"{spec.path}.{spec.bool_key}", value, spelled))
        return
    if not _is_mapping(value):
        allowed = "true, false or a mapping" if spec.bool_key else "a mapping"
        names = ", ".join(s.name for s in section_specs(spec.path) if s.field)
        out.problems.append(Problem(spelled, f"expected {allowed} ({names}), got {short_repr(value)}"))
        return
    _walk(value, spec.path, spelled, out)


def normalize(raw: Mapping) -> Normalized:
    """Normalise one source mapping (see the module docstring for the rules).

    Example:
        >>> n = normalize({"mp_size": 2, "moe": False})
        >>> sorted(n.settings), [w.category.__name__ for w in n.warnings]
        (['moe.enabled', 'tensor_parallel.tp_size'], ['DeprecationWarning'])
    """
    out = Normalized()
    raw, out.problems = plain_copy(raw)
    if type(raw) is not dict:  # over the size limit (the problem says so), or not a mapping at all
        if raw is not None:
            out.problems.append(Problem("", f"expected a mapping, got {short_repr(raw)}"))
        return out
    _walk(raw, "", "", out)
    return out


def from_settings(settings: Mapping[str, Any]) -> Normalized:
    """A :class:`Normalized` for canonical ``path -> value`` pairs (an existing config's non-defaults).

    Example:
        >>> from_settings({"tensor_parallel.tp_size": 2}).settings["tensor_parallel.tp_size"].spelled
        'tensor_parallel.tp_size'
    """
    out = Normalized()
    for path, value in settings.items():
        _add(out, Setting(path, value, path))
    return out
