"""Reading what the user gave, safely and at bounded cost: the limits, a plain copy, a bounded repr.

Everything a config source holds is walked once by :func:`plain_copy` before any rule looks at it. The walk
copies containers into plain ``dict`` / ``list`` / ``tuple`` and strips ``str`` / ``int`` / ``float``
subclasses down to the builtin value, so that no later comparison, hash or lookup can call a method of a
user's object. It stops with a :class:`~policyinject.config.errors.Problem` (never another exception) at:

- a value nested deeper than :data:`MAX_DEPTH` levels;
- a container that contains itself (a reference cycle);
- more than :data:`MAX_NODES` values in all (shared values count once per use, so a YAML "billion
  laughs" of nested aliases is stopped after :data:`MAX_NODES` steps, not expanded);
- a mapping whose ``items()`` raises, or a key that cannot be hashed;
- an integer of more than about 4,000 digits (it could not be written back as text).

Objects that are not plain data (process groups, an ``mpu``, classes, tensors, ``Policy`` objects) are
kept as they are, untouched: the key they belong to decides whether they are allowed.

Example:
    >>> copy, problems = plain_copy({"zero": {"stage": 3}, "n": [1, 2]})
    >>> copy, problems
    ({'zero': {'stage': 3}, 'n': [1, 2]}, [])
    >>> loop = {}; loop["me"] = loop
    >>> [str(p) for p in plain_copy({"zero": loop})[1]]
    ['zero.me: refers to itself (a reference cycle); give plain data']
    >>> bounded_repr("x" * 1000, 12)
    "'xxx...xxxx'"
"""

from __future__ import annotations

import reprlib
from typing import Any, Optional

from .errors import Problem

#: Deepest nesting accepted anywhere in a config (the schema itself is 3 levels deep).
MAX_DEPTH = 100
#: Most values (containers, keys and leaves, counted once per use) a config may hold.
MAX_NODES = 200_000
#: Largest config file read (bytes); a larger file is rejected before it is parsed.
MAX_FILE_BYTES = 16 * 1024 * 1024

#: Largest integer kept in free-form values (about 4,000 digits: Python and JSON refuse longer ones as text).
MAX_INT_BITS = 13_000

_SCALARS = (str, int, float, bool, type(None), bytes)


class TooLarge(Exception):
    """Internal: the node budget of :func:`plain_copy` is spent."""


def safe_text(obj: Any, limit: int = 200) -> str:
    """``str(obj)`` cut to ``limit`` characters; never raises (an object whose ``__str__`` fails is named).

    Example:
        >>> safe_text(ValueError("bad")), safe_text("y" * 10, 5)
        ('bad', 'yy...')
    """
    try:
        text = str(obj)
        if not isinstance(text, str):
            raise TypeError
    except Exception:
        return f"<{_type_name(obj)} object>"
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _type_name(obj: Any) -> str:
    try:
        return str(type(obj).__name__)
    except Exception:  # pragma: no cover - a metaclass with a broken __name__
        return "object"


class _BoundedRepr(reprlib.Repr):
    """``reprlib`` with every limit small, and no ``repr`` of a huge int or string ever built in full."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxarray = 4
        self.maxstring = self.maxother = max(limit, 8)
        self.maxlong = max(limit, 8)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # the decimal string would be long: never build it
            return f"<int of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return super().repr_int(int.__int__(x), level)

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(str.__str__(x[: self.maxstring + 2]), level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            text = repr(x)
            if not isinstance(text, str):
                raise TypeError
        except Exception:
            return f"<{_type_name(x)} object>"
        return text if len(text) <= self.maxother else text[: self.maxother - 3] + "..."


def bounded_repr(value: Any, limit: int = 60) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, built at bounded cost; never raises.

    Containers show their first few items and three levels (reprlib); a user object's own ``repr`` is
    called once and cut (one that raises is named by its type).

    Example:
        >>> bounded_repr([[[[[1]]]]]), bounded_repr(10 ** 5000)
        ('[[[[...]]]]', '<int of about 5001 digits>')
    """
    try:
        if isinstance(value, str) and type(value) is not str:
            value = str.__str__(value)
        text = _BoundedRepr(limit).repr(value)
    except Exception:
        text = f"<{_type_name(value)} object>"
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def key_text(key: Any, prefix: str) -> str:
    """The dotted path of ``key`` under ``prefix``, as the user wrote it (non-string keys in brackets).

    Example:
        >>> key_text("tp_size", "tp"), key_text(3, "zero"), key_text("a", "")
        ('tp.tp_size', 'zero[3]', 'a')
    """
    if type(key) is str:
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{bounded_repr(key, 40)}]"


class _Walk:
    def __init__(self, max_nodes: int, max_depth: int) -> None:
        self.nodes = 0
        self.max_nodes = max_nodes
        self.max_depth = max_depth
        self.problems: list = []
        self.open: set = set()  # ids of the containers being copied (the current path)

    def count(self) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise TooLarge

    def copy(self, value: Any, path: str, depth: int) -> "tuple[bool, Any]":
        """``(ok, copy)``; ``ok`` False drops the value (a problem was recorded)."""
        self.count()
        t = type(value)
        if t is int and value.bit_length() > MAX_INT_BITS:
            self.problems.append(Problem(path, f"is an integer of more than {MAX_INT_BITS * 3 // 10:,} digits"))
            return False, None
        if t in _SCALARS:
            return True, value
        try:
            if issubclass(t, str):
                return True, str.__str__(value)
            if issubclass(t, int) and not issubclass(t, bool):
                return self.copy(int.__int__(value), path, depth)
            if issubclass(t, float):
                return True, float.__float__(value)
            items = self._items(value, t)
            is_seq = items is None and issubclass(t, (list, tuple))
        except Exception as e:
            self.problems.append(Problem(path, f"cannot be read: {_type_name(e)}: {safe_text(e)}"))
            return False, None
        if items is None and not is_seq:
            return True, value  # a live object (or a tensor, a class, ...): kept as it is
        if id(value) in self.open:
            self.problems.append(Problem(path, "refers to itself (a reference cycle); give plain data"))
            return False, None
        if depth >= self.max_depth:
            shown = path if len(path) <= 120 else f"{path[:60]}...{path[-50:]}"
            self.problems.append(Problem(shown, f"is nested more than {self.max_depth} levels deep"))
            return False, None
        self.open.add(id(value))
        try:
            if items is not None:
                return True, self._mapping(items, path, depth)
            out = [self.copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(list.__iter__(value)
                                                                               if issubclass(t, list)
                                                                               else tuple.__iter__(value))]
            kept = [v for ok, v in out if ok]
            return True, (kept if issubclass(t, list) else tuple(kept))
        finally:
            self.open.discard(id(value))

    def _items(self, value: Any, t: type) -> Optional[list]:
        if issubclass(t, dict):
            return list(dict.items(value))
        items = getattr(t, "items", None)
        if callable(items) and callable(getattr(t, "keys", None)) and not issubclass(t, (list, tuple)):
            pairs = list(value.items())
            if not all(type(p) is tuple and len(p) == 2 for p in pairs):
                raise TypeError("items() did not give (key, value) pairs")
            return pairs
        return None

    def _mapping(self, items: list, path: str, depth: int) -> dict:
        out: dict = {}
        for key, item in items:
            where = key_text(key, path)
            ok, k = self.copy(key, where, depth + 1)
            if not ok:
                continue
            try:
                hash(k)
                if k in out:
                    self.problems.append(Problem(where, "is given more than once"))
                    continue
            except Exception as e:
                self.problems.append(Problem(where, f"key cannot be hashed: {_type_name(e)}: {safe_text(e)}"))
                continue
            ok, v = self.copy(item, where, depth + 1)
            if ok:
                try:
                    out[k] = v
                except Exception as e:
                    self.problems.append(Problem(where, f"key cannot be stored: {_type_name(e)}: {safe_text(e)}"))
        return out


def plain_copy(value: Any, path: str = "", max_nodes: int = MAX_NODES,
               max_depth: int = MAX_DEPTH) -> "tuple[Any, list]":
    """A plain-data copy of ``value`` and the problems found; values with a problem are left out of the copy.

    Never raises for any input: an input over :data:`MAX_NODES` values gives ``(None, [problem])``.

    Example:
        >>> plain_copy([1, [2, [3]]], "x", max_depth=2)
        ([1, [2]], [Problem(path='x[1][1]', message='is nested more than 2 levels deep')])
    """
    walk = _Walk(max_nodes, max_depth)
    try:
        ok, out = walk.copy(value, path, 0)
    except TooLarge:
        what = "this value" if path else "the configuration"
        return None, [Problem(path, f"{what} holds more than {max_nodes:,} values (a YAML alias counts once per "
                                    "use); a configuration is never that large")]
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps the walk far from the interpreter's limit
        return None, [Problem(path, "is nested too deeply")]
    return (out if ok else None), walk.problems
