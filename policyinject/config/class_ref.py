"""A layer class named by a string in ``injection_policy``: kept as a name, never imported.

Validating a config runs no user code. A string key of ``injection_policy`` (``"evil_mod.Block"``) is
stored as a :class:`ClassRef`; nothing is imported, neither while the config is validated nor at plan
time. At plan time :func:`resolve_injection_policy` matches each reference against the classes of the
model's own modules (which the user has already imported):

- exactly, when ``f"{cls.__module__}.{cls.__qualname__}"`` is the name as written;
- otherwise as a re-export from a parent package, the way importing the name would have found it: the
  name ends with ``"." + cls.__qualname__`` and what comes before is ``cls.__module__`` or one of its
  parent packages (``"torch.nn.TransformerEncoderLayer"`` names
  ``torch.nn.modules.transformer.TransformerEncoderLayer``). An exact match wins; two different classes
  matching only this way is an error asking for the full name.

A name that matches no class of the model is a ``PolicyError`` naming the key as written and the
model's classes closest to it.

Example:
    >>> import torch
    >>> ref = ClassRef("torch.nn.TransformerEncoderLayer")
    >>> ref.matches(torch.nn.TransformerEncoderLayer), ref.matches(torch.nn.Linear)
    (True, False)
    >>> ClassRef("torch.nn.modules.linear.Linear").matches(torch.nn.Linear)
    True
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import attrs

from ..errors import PolicyError


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@attrs.frozen
class ClassRef:
    """A class named by its qualified name as the user wrote it (``"pkg.module.Class"``); never imported."""

    qualname: str

    @property
    def name(self) -> str:
        """The bare class name (the last dotted part)."""
        return self.qualname.rsplit(".", 1)[-1]

    def exact(self, cls: type) -> bool:
        """Whether ``cls``'s own qualified name is this name.

        Example:
            >>> import collections
            >>> ClassRef("collections.OrderedDict").exact(collections.OrderedDict)
            True
        """
        return _qualified(cls) == self.qualname

    def matches(self, cls: type) -> bool:
        """Whether this name names ``cls``: exactly, or as a re-export from a parent package of its module.

        Example:
            >>> import torch
            >>> ClassRef("torch.nn.Linear").matches(torch.nn.Linear), ClassRef("torch.Linear").matches(torch.nn.Linear)
            (True, True)
            >>> ClassRef("torchvision.Linear").matches(torch.nn.Linear), ClassRef("nn.Linear").matches(torch.nn.Linear)
            (False, False)
        """
        if self.exact(cls):
            return True
        module, qualname = str(getattr(cls, "__module__", "")), str(getattr(cls, "__qualname__", ""))
        if not qualname or not self.qualname.endswith("." + qualname):
            return False
        package = self.qualname[: -len(qualname) - 1]
        return module == package or module.startswith(package + ".")

    def __str__(self) -> str:
        return self.qualname


def _closest(ref: ClassRef, classes: Iterable[type]) -> str:
    names = sorted({_qualified(c) for c in classes})
    bare = {_qualified(c): c.__name__ for c in classes}
    close = [n for n in names if bare.get(n) == ref.name]
    close += [n for n in difflib.get_close_matches(ref.qualname, names, n=3, cutoff=0.5) if n not in close]
    return f"; the closest classes in the model are {', '.join(close[:3])}" if close else ""


def resolve_ref(ref: ClassRef, classes: Iterable[type]) -> type:
    """The one class of ``classes`` that ``ref`` names; ``PolicyError`` when none or several do.

    Example:
        >>> import torch
        >>> resolve_ref(ClassRef("torch.nn.Linear"), [torch.nn.Linear, torch.nn.ReLU]).__name__
        'Linear'
        >>> resolve_ref(ClassRef("torch.nn.Lineer"), [torch.nn.Linear])
        Traceback (most recent call last):
        ...
        policyinject.errors.PolicyError: injection_policy['torch.nn.Lineer']: names no class of the model's modules (nothing is imported to find it; the name must be the class's module and qualified name, or a parent package of its module and its name); the closest classes in the model are torch.nn.modules.linear.Linear
    """
    classes = list(dict.fromkeys(classes))
    exact = [c for c in classes if ref.exact(c)]
    if len(exact) == 1:
        return exact[0]
    found = exact or [c for c in classes if ref.matches(c)]
    if len(found) == 1:
        return found[0]
    where = f"injection_policy[{ref.qualname!r}]"
    if found:
        raise PolicyError(f"{where}: names several classes of the model ({', '.join(sorted(map(_qualified, found)))}); "
                          "write the full module path of the one meant")
    raise PolicyError(f"{where}: names no class of the model's modules (nothing is imported to find it; the name "
                      "must be the class's module and qualified name, or a parent package of its module and its "
                      f"name){_closest(ref, classes)}")


def resolve_injection_policy(injection_policy: Mapping[Any, Any], model: Any) -> list:
    """``injection_policy`` with each :class:`ClassRef` key replaced by the model's class it names.

    Returns ``[(layer class, entry)]`` in the order given; class keys pass through unchanged (with ``model``
    None, a name stays its string, which a ``Policy`` matches by exact qualified name). Raises
    ``PolicyError`` (naming the key as written) for a name that matches no class of ``model``'s modules or
    several, for two keys naming the same class, and for a ``Policy`` entry that describes another class.
    Imports nothing.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> [(c.__name__, v) for c, v in resolve_injection_policy({ClassRef("torch.nn.Linear"): ("x",)}, model)]
        [('Linear', ('x',))]
    """
    from ..policy.model import Policy

    if model is None:
        return [(k.qualname if isinstance(k, ClassRef) else k, v) for k, v in injection_policy.items()]
    classes = [type(m) for m in model.modules()]
    out: list = []
    owner: dict = {}
    for key, entry in injection_policy.items():
        written = f"injection_policy[{key.qualname!r}]" if isinstance(key, ClassRef) else \
            f"injection_policy[{getattr(key, '__name__', key)}]"
        cls = resolve_ref(key, classes) if isinstance(key, ClassRef) else key
        if cls in owner:
            raise PolicyError(f"{written}: names {_qualified(cls)}, which {owner[cls]} names too; give it once")
        owner[cls] = written
        if isinstance(entry, Policy) and not (entry.matches(cls) or (
                isinstance(entry.layer, str) and ClassRef(entry.layer).matches(cls))):
            raise PolicyError(f"{written}: the Policy describes {entry.qualified_name}, not {_qualified(cls)}")
        out.append((cls, entry))
    return out
