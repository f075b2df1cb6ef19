"""Calling conventions of the Hugging Face modules an injected module replaces.

An injected module must accept the same arguments, positional or keyword, as the module it replaces, in every
supported transformers version (the cache keyword is ``cache`` in newer 5.x, ``past_key_values`` or
``layer_past`` in older code), and return the same shape of result (a tensor, or a tuple whose first item is
the hidden states). These helpers read both from the replaced class once, at injection time.

Example:
    >>> class Layer:
    ...     def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
    ...         outputs = (hidden_states,)
    ...         return outputs
    >>> sig = CallSignature.of(Layer)
    >>> b = sig.bind(("h", "m"), {"past_key_values": "c"})
    >>> b["hidden_states"], b["attention_mask"], find_cache(b)
    ('h', 'm', 'c')
    >>> sig.tuple_len
    1
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, Optional

import attrs

#: Keyword names under which Hugging Face modules receive the KV cache object, newest first.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


@attrs.frozen
class CallSignature:
    """Positional parameter names of a module's ``forward`` and how many items it returns (0: a tensor)."""

    names: tuple
    tuple_len: int = 0

    @classmethod
    def of(cls, module_class: type) -> "CallSignature":
        fn = module_class.forward
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        names = tuple(p.name for p in params[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        return cls(names=names, tuple_len=_returned_tuple_len(fn))

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """Map positional ``args`` to their names; merge ``kwargs`` (which win)."""
        if len(args) > len(self.names):
            raise TypeError(f"got {len(args)} positional arguments, the replaced forward takes {len(self.names)}")
        bound = dict(zip(self.names, args))
        bound.update(kwargs)
        return bound

    def hidden(self, bound: dict) -> Any:
        """The hidden states among the bound arguments: ``hidden_states``, else the first positional parameter
        (a plain ``forward(self, x)``)."""
        if "hidden_states" in bound:
            return bound["hidden_states"]
        if self.names and self.names[0] in bound:
            return bound[self.names[0]]
        raise TypeError(f"the replaced forward takes {self.names}; no hidden states were given")

    def wrap(self, hidden: Any, extra: Any = None) -> Any:
        """Return ``hidden`` in the replaced module's result shape (``extra`` fills the second slot)."""
        if not self.tuple_len:
            return hidden
        return (hidden, extra) + (None,) * (self.tuple_len - 2) if self.tuple_len > 1 else (hidden,)


def find_cache(bound: dict) -> Optional[Any]:
    """The KV cache object among the bound arguments (any of :data:`CACHE_NAMES`), or None."""
    for name in CACHE_NAMES:
        value = bound.get(name)
        if value is not None:
            return value
    return None


def _returned_tuple_len(fn: Any) -> int:
    """0 when ``fn`` returns a tensor; the tuple length when it returns a tuple.

    Read from the return annotation when it is conclusive, else from the last ``return`` of the source
    (a tuple literal, or a name last assigned a tuple literal).
    """
    target = inspect.unwrap(fn)
    ann = inspect.signature(target).return_annotation
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
    if ann is not inspect.Signature.empty and text in ("Tensor", "torch.Tensor", "FloatTensor", "torch.FloatTensor"):
        return 0
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
    except (OSError, TypeError, SyntaxError):
        return 0
    func = tree.body[0]
    returns = [n for n in ast.walk(func) if isinstance(n, ast.Return) and n.value is not None]
    if not returns:
        return 0
    value = returns[-1].value
    if isinstance(value, ast.Tuple):
        return len(value.elts)
    if isinstance(value, ast.Name):
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == value.id for t in node.targets):
                if isinstance(node.value, ast.Tuple):
                    return len(node.value.elts)
    return 0
