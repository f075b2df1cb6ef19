"""Where a policy's sizes and values come from: literals, model-config attributes or callables.

A head count in a policy (:data:`SizeSource`) or a real-valued setting such as a scale or a soft-cap
(:data:`ValueSource`) is read by :func:`read_size` / :func:`read_value`, so every pass reads them the same way.

Example:
    >>> import types
    >>> cfg = types.SimpleNamespace(num_attention_heads=8, text=types.SimpleNamespace(heads=4))
    >>> read_size(cfg, "num_attention_heads"), read_size(cfg, "text.heads"), read_size(cfg, 3)
    (8, 4, 3)
    >>> read_value(cfg, ("missing", "num_attention_heads"))
    8.0
    >>> read_size({"num_attention_heads": 8, "text": {"heads": 4}}, "text.heads")
    4
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from ..errors import PolicyError

#: A head count (or other size): a literal ``int``; a model-config attribute name or a tuple of candidate names
#: (first present wins; dotted paths allowed); a callable ``config -> int``; or a callable ``(layer, config) ->
#: int`` (two required positional parameters), which receives the layer instance and the model config -- None
#: for a model without one. None (or a source that gives None): unset, so the geometry falls back to the
#: layer's own modules (:func:`policyinject.policy.geometry.layer_geometry`).
SizeSource = Union[int, str, tuple, Callable[..., Optional[int]], None]
#: A real-valued setting (a scale, a cap): a number, a config attribute name (dotted paths allowed), a tuple of
#: candidate names (first present and not None wins), or a callable ``config -> float | None``. None: unset.
ValueSource = Union[float, int, str, tuple, Callable[[Any], Optional[float]], None]


def _tuple_of_str(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def read_size(model_config: Any, source: SizeSource, what: str = "size", layer: Any = None) -> Optional[int]:
    """Read a size following a :data:`SizeSource`; None when the source gives nothing.

    A literal needs no config; a config attribute or a ``config -> int`` callable gives None without a model
    config; a ``(layer, config) -> int`` callable is called only when ``layer`` is given (it receives
    ``model_config`` as it is, possibly None).

    Example:
        >>> class C: num_attention_heads = 9
        >>> read_size(C(), ("num_heads", "num_attention_heads")), read_size(None, 4)
        (9, 4)
        >>> read_size(None, lambda layer, config: layer.n, layer=type("L", (), {"n": 3})())
        3
    """
    if source is None:
        return None
    if isinstance(source, bool):
        raise PolicyError(f"a {what} source must be an int, a config attribute or a callable, got {source!r}")
    if isinstance(source, int):
        return int(source)
    if callable(source) and not isinstance(source, str):
        if takes_layer(source):
            if layer is None:
                return None
            value = source(layer, model_config)
        else:
            if model_config is None:
                return None
            value = source(model_config)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int,)) and not _integral(value):
            raise PolicyError(f"the {what} callable {_callable_name(source)} returned {value!r}, not an int")
        return int(value)
    if model_config is None:
        return None
    value = _first_attribute(model_config, source)
    return None if value is None else int(value)


def takes_layer(source: Callable[..., Any]) -> bool:
    """True when a size callable has two required positional parameters (or ``*args``): ``(layer, config)``.

    Example:
        >>> takes_layer(lambda config: 1), takes_layer(lambda layer, config: 1), takes_layer(max)
        (False, True, False)
    """
    import inspect

    try:
        params = inspect.signature(source).parameters.values()
    except (TypeError, ValueError):
        return False
    required = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) \
                and p.default is inspect.Parameter.empty:
            required += 1
    return required >= 2


def _integral(value: Any) -> bool:
    try:
        return int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def read_value(model_config: Any, source: ValueSource) -> Optional[float]:
    """Read a real-valued setting following a :data:`ValueSource`; None when unset (or the config is absent
    and the source is not a number).

    Example:
        >>> class C: logits_scaling = 4.0; attn_config = type("A", (), {"clip_qkv": None})()
        >>> read_value(C(), "logits_scaling"), read_value(None, 8), read_value(C(), "attn_config.clip_qkv")
        (4.0, 8.0, None)
        >>> read_value(C(), lambda c: 1 / c.logits_scaling)
        0.25
    """
    if source is None:
        return None
    if isinstance(source, bool):
        raise PolicyError(f"a value source must be a number, a config attribute or a callable, got {source!r}")
    if isinstance(source, (int, float)):
        return float(source)
    if model_config is None:
        return None
    if callable(source) and not isinstance(source, str):
        value = source(model_config)
        return None if value is None else float(value)
    value = _first_attribute(model_config, source)
    return None if value is None else float(value)


def _first_attribute(model_config: Any, source: Any) -> Any:
    """The first of the (dotted) names in ``source`` that ``model_config`` sets; None if none.

    Each step reads an attribute, or a key of a mapping (the ``config`` / ``args`` key given as a dict).
    """
    for name in _tuple_of_str(source):
        obj = model_config
        for part in name.split("."):
            obj = obj.get(part) if isinstance(obj, Mapping) else getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None
