"""The one exception bad configuration input raises, and the records it and the warnings carry.

:class:`ConfigError` lists *every* problem found, each as a :class:`Problem` whose ``path`` is the dotted
key path spelled the way the user spelled it (an alias stays an alias: ``tp.tp_size``). Warnings found
while loading are returned as :class:`ConfigWarning` records (and emitted by ``load_config``).

Example:
    >>> err = ConfigError([Problem("tp.tp_size", "must be >= 1, got 0"),
    ...                    Problem("tensor_paralel", "unknown key")])
    >>> print(err)
    tp.tp_size: must be >= 1, got 0
    tensor_paralel: unknown key
    >>> isinstance(err, ValueError), [p.path for p in err.problems]
    (True, ['tp.tp_size', 'tensor_paralel'])
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import attrs

from ..errors import PolicyInjectError


@attrs.frozen
class Problem:
    """One thing wrong with the configuration: where (dotted key path, as written) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@attrs.frozen
class ConfigWarning:
    """One warning found while loading: a deprecated key, or a value policyinject cannot honour.

    ``category`` is the warning class (``DeprecationWarning`` or ``UserWarning``).
    """

    category: type
    path: str
    message: str

    def __str__(self) -> str:
        return self.message


#: How many problems ``str(ConfigError)`` shows; ``ConfigError.problems`` always holds every one.
MAX_SHOWN = 200


class ConfigError(PolicyInjectError, ValueError):
    """Bad configuration input. ``problems`` holds every :class:`Problem` found; ``str()`` lists one per line.

    ``warnings`` holds the :class:`ConfigWarning` records found before the error (deprecated keys, ...).
    """

    def __init__(
        self,
        problems: Union[str, Problem, Iterable[Union[str, Problem]]],
        warnings: Iterable[ConfigWarning] = (),
    ) -> None:
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        items = [p if isinstance(p, Problem) else Problem("", str(p)) for p in problems]
        unique = list(dict.fromkeys(items))  # order kept, duplicates dropped, linear time
        self.problems: list = unique
        self.warnings: list = list(warnings)
        shown = [str(p) for p in unique[:MAX_SHOWN]]
        if len(unique) > MAX_SHOWN:
            shown.append(f"... and {len(unique) - MAX_SHOWN} more problems (all are listed in .problems)")
        super().__init__("\n".join(shown))

    def __reduce__(self):
        return (type(self), (self.problems, self.warnings))


class InvalidValue(ValueError):
    """Internal: raised by a value converter. ``problems`` are ``(sub_path, message)`` pairs.

    ``sub_path`` is appended to the key's own path (``""`` for the key itself, ``"['pkg.Cls']"`` for an
    entry of a mapping-valued key). Never escapes ``load_config``: it becomes a :class:`Problem`.
    """

    def __init__(self, message: str = "", problems: Sequence[tuple] = ()) -> None:
        self.problems = list(problems) if problems else [("", message)]
        super().__init__("; ".join(m for _, m in self.problems))


def short_repr(value: object, limit: int = 60, typed: bool = True) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, with the type name (unless ``typed=False``) for
    non-obvious values. Built at bounded cost (nested containers are cut, huge ints never turned into
    text) and never raises: a user object whose ``repr`` fails is named by its type.

    Example:
        >>> short_repr("yes"), short_repr(1.5), short_repr(None), short_repr(2, typed=False)
        ("'yes' (str)", '1.5 (float)', 'None', '2')
    """
    from .inputs import _type_name, bounded_repr

    text = bounded_repr(value, limit)
    if not typed or value is None or type(value) is bool:
        return text
    return f"{text} ({_type_name(value)})"
