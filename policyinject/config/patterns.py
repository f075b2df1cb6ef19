"""Module-name patterns (``quant.weight.include`` / ``quant.weight.exclude``): validation and matching.

A pattern is matched against a module's full dotted path in the model (``model.layers.0.mlp.down_proj``) and
must match the **whole** path:

- a shell-style glob (``fnmatch``, case-sensitive): ``*`` matches any run of characters, dots included;
  ``?`` one character; ``[seq]`` one of a set. ``"*.mlp.*"``, ``"model.layers.1[0-9].*"``, ``"lm_head"``.
- a regular expression when prefixed with ``re:`` (``"re:.*\\.(q|k|v)_proj"``), matched with
  ``re.fullmatch``.

Validation is strict, so a config file cannot make matching slow: a value is one string or a list of at most
:data:`MAX_PATTERNS` strings, each non-empty, at most :data:`MAX_LENGTH` characters, printable (no NUL or
control characters); a regex must compile, may not nest quantifiers (``(a+)+``, ``(a*)*`` -- the shapes of
catastrophic backtracking) and may not use back-references. Globs are translated by ``fnmatch``, whose
regexes never backtrack catastrophically.

Example:
    >>> pats = module_patterns(["*.mlp.*", "re:.*\\\\.o_proj"])
    >>> pats
    ('*.mlp.*', 're:.*\\\\.o_proj')
    >>> first_match(pats, "model.layers.0.mlp.up_proj"), first_match(pats, "model.layers.0.self_attn.o_proj")
    ('*.mlp.*', 're:.*\\\\.o_proj')
    >>> first_match(pats, "lm_head") is None
    True
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any, Optional, Pattern, Tuple

from .errors import InvalidValue, short_repr

__all__ = ["MAX_LENGTH", "MAX_PATTERNS", "REGEX_PREFIX", "module_patterns", "first_match", "compile_pattern"]

#: At most this many patterns per key, each at most this many characters.
MAX_PATTERNS = 256
MAX_LENGTH = 256
#: Prefix of a regular-expression pattern.
REGEX_PREFIX = "re:"


def module_patterns(value: Any) -> Optional[Tuple[str, ...]]:
    """Converter of a pattern key: None, or a tuple of validated patterns (a single string is one pattern).

    Example:
        >>> module_patterns("lm_head"), module_patterns(None)
        (('lm_head',), None)
        >>> try:
        ...     module_patterns(["re:(a+)+$"])
        ... except ValueError as e:
        ...     print(e)
        the regex 're:(a+)+$' nests a quantifier or an alternation inside a repeated group (catastrophic backtracking); write it without the nesting
    """
    if value is None:
        return None
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InvalidValue(f"expected a pattern string or a list of them, got {short_repr(value)}")
    if not items:
        raise InvalidValue("expected at least one pattern (null, the default, means no patterns)")
    if len(items) > MAX_PATTERNS:
        raise InvalidValue(f"at most {MAX_PATTERNS} patterns, got {len(items)}")
    problems = []
    out = []
    for i, item in enumerate(items):
        sub = "" if isinstance(value, str) else f"[{i}]"
        try:
            out.append(_one(item))
        except InvalidValue as exc:
            problems.append((sub, str(exc)))
    if problems:
        raise InvalidValue(problems=problems)
    return tuple(out)


def _one(item: Any) -> str:
    if not isinstance(item, str):
        raise InvalidValue(f"a pattern must be a string, got {short_repr(item)}")
    item = str.__str__(item)
    if not item or item == REGEX_PREFIX:
        raise InvalidValue("a pattern cannot be empty")
    if len(item) > MAX_LENGTH:
        raise InvalidValue(f"a pattern is at most {MAX_LENGTH} characters, got {len(item)}")
    if not item.isprintable():
        raise InvalidValue(f"a pattern cannot contain control characters, got {short_repr(item, typed=False)}")
    if item.startswith(REGEX_PREFIX):
        _check_regex(item)
    return item


def _check_regex(item: str) -> None:
    body = item[len(REGEX_PREFIX):]
    try:
        parsed = _parse(body)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidValue(f"the regex {item!r} does not compile: {exc}") from None
    if _nested_repeat(parsed, inside=False):
        raise InvalidValue(f"the regex {item!r} nests a quantifier or an alternation inside a repeated group "
                           "(catastrophic backtracking); write it without the nesting")
    if _count_unbounded(parsed) > MAX_UNBOUNDED:
        raise InvalidValue(f"the regex {item!r} has more than {MAX_UNBOUNDED} unbounded repeats (*, +, {{n,}}); "
                           "matching time grows with their number")
    if _has(parsed, {"GROUPREF", "GROUPREF_EXISTS"}):
        raise InvalidValue(f"the regex {item!r} uses a back-reference; module-name patterns cannot")


def _parse(body: str) -> Any:
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser  # type: ignore[no-redef]
    return parser.parse(body)


_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
#: At most this many unbounded repeats in one regex.
MAX_UNBOUNDED = 4


def _items(node: Any) -> list:
    """The (opcode name, argument) pairs of a parsed (sub)pattern."""
    data = getattr(node, "data", node)
    return [(str(op), av) for op, av in data] if isinstance(data, list) else []


def _children(av: Any) -> list:
    """Sub-patterns inside an opcode's argument (repeats, groups, branches, assertions)."""
    out: list = []
    stack = [av]
    while stack:
        x = stack.pop()
        if hasattr(x, "data"):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


def _unbounded(hi: Any) -> bool:
    return hi is None or str(hi) == "MAXREPEAT" or (isinstance(hi, int) and hi > 1)


def _count_unbounded(node: Any) -> int:
    total = 0
    for op, av in _items(node):
        if op in _REPEATS and (av[1] is None or str(av[1]) == "MAXREPEAT"):
            total += 1
        total += sum(_count_unbounded(c) for c in _children(av[2] if op in _REPEATS else av))
    return total


def _nested_repeat(node: Any, inside: bool) -> bool:
    for op, av in _items(node):
        if inside and op == "BRANCH":
            return True
        is_repeat = op in _REPEATS
        if is_repeat:
            unbounded_or_many = _unbounded(av[1])
            if inside and unbounded_or_many:
                return True
            if any(_nested_repeat(c, inside or unbounded_or_many) for c in _children(av[2])):
                return True
            continue
        if any(_nested_repeat(c, inside) for c in _children(av)):
            return True
    return False


def _has(node: Any, ops: set) -> bool:
    for op, av in _items(node):
        if op in ops:
            return True
        if any(_has(c, ops) for c in _children(av)):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Pattern:
    """The compiled whole-path regex of one validated pattern (glob or ``re:``).

    Example:
        >>> bool(compile_pattern("*.fc?").fullmatch("layers.0.fc1"))
        True
    """
    if pattern.startswith(REGEX_PREFIX):
        return re.compile(pattern[len(REGEX_PREFIX):])
    return re.compile(fnmatch.translate(pattern))


def first_match(patterns: Optional[Tuple[str, ...]], path: str) -> Optional[str]:
    """The first of ``patterns`` matching the whole module ``path``, or None (also for no patterns)."""
    for pattern in patterns or ():
        if compile_pattern(pattern).fullmatch(path):
            return pattern
    return None
