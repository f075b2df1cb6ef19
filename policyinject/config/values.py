"""Leaf value converters and dumpers: one strict, idempotent function per kind of value.

A converter takes what the user wrote and returns the canonical value, or raises ``InvalidValue`` naming
what was wrong. Converters never coerce across types: ``"yes"`` is not a bool, ``1.5`` and ``True`` are not
ints. Applying a converter to its own output returns it unchanged (the attrs classes re-apply them).

A dumper turns a canonical value into its JSON form for ``InferenceConfig.to_dict``; it returns
:data:`OMIT` for live objects that have no JSON form (process groups, an ``mpu``, ``Policy`` objects).

Example:
    >>> positive_int(3), boolean(False), optional_positive_int(None)
    (3, False, None)
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any, Callable, Optional, Sequence

import torch

from ..policy.model import Policy
from .class_ref import ClassRef
from .errors import InvalidValue, short_repr
from .inputs import bounded_repr, plain_copy


class _Omit:
    """Marker a dumper returns for a value that has no JSON form; the key is left out of ``to_dict``."""

    def __repr__(self) -> str:
        return "OMIT"


#: The value dumpers return to leave a key out of ``to_dict``.
OMIT = _Omit()

_JSON_SCALARS = (str, int, float, bool, type(None))


# -- scalars -------------------------------------------------------------------------------------------

def boolean(value: Any) -> bool:
    """A real bool; ``"yes"``, ``1`` and ``None`` are rejected.

    Example:
        >>> boolean(True)
        True
    """
    if isinstance(value, bool):
        return value
    raise InvalidValue(f"expected true or false, got {short_repr(value)}")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"expected an integer, got {short_repr(value)}")
    number = int.__int__(value)  # a plain int: an int subclass's own methods never run
    if not -(2 ** 63) <= number < 2 ** 63:
        raise InvalidValue(f"is out of range (more than 64 bits), got {short_repr(number)}")
    return number


def positive_int(value: Any) -> int:
    """An int >= 1 (bools and floats rejected).

    Example:
        >>> try:
        ...     positive_int(0)
        ... except ValueError as e:
        ...     print(e)
        must be >= 1, got 0
    """
    number = _integer(value)
    if number < 1:
        raise InvalidValue(f"must be >= 1, got {number}")
    return number


def int_at_least(low: int) -> Callable[[Any], int]:
    """A converter accepting an int >= ``low`` (bools and floats rejected).

    Example:
        >>> int_at_least(0)(0), int_at_least(2)(512)
        (0, 512)
        >>> int_at_least(2)(1)
        Traceback (most recent call last):
        ...
        policyinject.config.errors.InvalidValue: must be >= 2, got 1
    """
    def convert(value: Any) -> int:
        number = _integer(value)
        if number < low:
            raise InvalidValue(f"must be >= {low}, got {number}")
        return number

    return convert


def positive_seconds(value: Any) -> float:
    """A finite number of seconds > 0 (an int or a float; bools, strings, NaN and infinity rejected).

    Example:
        >>> positive_seconds(300), positive_seconds(2.5)
        (300.0, 2.5)
        >>> positive_seconds(0)
        Traceback (most recent call last):
        ...
        policyinject.config.errors.InvalidValue: must be > 0 seconds, got 0
    """
    return _positive(value, "a number of seconds", "> 0 seconds")


def _positive(value: Any, expected: str, must: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"expected {expected}, got {short_repr(value)}")
    number = float(int.__int__(value)) if isinstance(value, int) else float.__float__(value)
    if not math.isfinite(number) or number <= 0:
        raise InvalidValue(f"must be {must}, got {short_repr(value, typed=False)}")
    return number


def positive_number(value: Any) -> float:
    """A finite number > 0 (an int or a float; bools, strings, NaN and infinity rejected, as in
    :func:`positive_seconds`).

    Example:
        >>> positive_number(0.2), positive_number(1)
        (0.2, 1.0)
    """
    return _positive(value, "a number", "a finite number > 0")


def optional_positive_int(value: Any) -> Optional[int]:
    """None, or an int >= 1.

    Example:
        >>> optional_positive_int(4)
        4
    """
    return None if value is None else positive_int(value)


def num_bits(value: Any) -> int:
    """Quantization bit width: 4 or 8.

    Example:
        >>> num_bits(4)
        4
    """
    bits = _integer(value)
    if bits not in (4, 8):
        raise InvalidValue(f"must be 4 or 8, got {bits}")
    return bits


def choice(*allowed: str) -> Callable[[Any], str]:
    """A converter accepting exactly one of ``allowed`` (with a did-you-mean hint).

    Example:
        >>> choice("symmetric", "asymmetric")("symmetric")
        'symmetric'
        >>> try:
        ...     choice("symmetric", "asymmetric")("symetric")
        ... except ValueError as e:
        ...     print(e)
        expected one of "symmetric", "asymmetric"; got 'symetric'; did you mean "symmetric"?
    """
    listed = ", ".join(f'"{a}"' for a in allowed)

    def convert(value: Any) -> str:
        if isinstance(value, str):
            value = str.__str__(value)  # a str subclass's own __eq__ never runs
        if isinstance(value, str) and value in allowed:
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise InvalidValue(f"expected one of {listed}; got {short_repr(value, typed=False)}{hint}")
        raise InvalidValue(f"expected one of {listed}; got {short_repr(value)}")

    convert.allowed = allowed  # type: ignore[attr-defined]
    return convert


def text(value: Any) -> str:
    """A string (a path-like object becomes its string); a NUL byte is rejected (text keys are paths).

    Example:
        >>> text("ckpt/")
        'ckpt/'
    """
    if isinstance(value, os.PathLike) and not isinstance(value, str):
        try:
            value = os.fspath(value)
        except Exception as e:
            raise InvalidValue(f"the path-like object cannot be read: {type(e).__name__}") from None
    if isinstance(value, str):
        if "\0" in value:  # every text key is a filesystem path, and no path holds a NUL byte
            raise InvalidValue(f"a path cannot contain a NUL byte, got {short_repr(value)}")
        return str.__str__(value)
    raise InvalidValue(f"expected a string, got {short_repr(value)}")


def optional_text(value: Any) -> Optional[str]:
    """None, or a string / path.

    Example:
        >>> optional_text(None) is None
        True
    """
    return None if value is None else text(value)


# -- containers ----------------------------------------------------------------------------------------

def _is_mapping(value: Any) -> bool:
    """Whether ``value`` is a mapping (a dict, or a type with ``items`` and ``keys``); looks at the type only."""
    t = type(value)
    try:
        return issubclass(t, dict) or (callable(getattr(t, "items", None)) and callable(getattr(t, "keys", None))
                                       and not issubclass(t, (str, bytes, list, tuple)))
    except Exception:
        return False


def _items(value: Any) -> list:
    """``list(value.items())``; a mapping whose ``items()`` fails is an ``InvalidValue``."""
    try:
        return list(dict.items(value) if isinstance(value, dict) else value.items())
    except Exception as e:
        raise InvalidValue(f"the mapping cannot be read: {type(e).__name__}") from None


def mapping(value: Any) -> dict:
    """A mapping with string keys, copied into a plain dict (values kept as given).

    Example:
        >>> mapping({"stage": 3})
        {'stage': 3}
    """
    if not _is_mapping(value):
        raise InvalidValue(f"expected a mapping, got {short_repr(value)}")
    copy, problems = plain_copy(value)  # plain data, acyclic, bounded depth and size
    if problems:
        raise InvalidValue(problems=[(_sub_path(p.path), p.message) for p in problems])
    bad = [k for k in copy if type(k) is not str]
    if bad:
        raise InvalidValue(f"keys must be strings, got {short_repr(bad[0])}")
    return copy


def _sub_path(path: str) -> str:
    return path if not path or path.startswith("[") else f".{path}"


def checkpoint(value: Any) -> Any:
    """None, a path to a checkpoint description (str / path-like), or the description as a mapping.

    Example:
        >>> checkpoint("ckpt.json"), checkpoint({"type": "ds_model", "checkpoints": ["a.pt"]})["type"]
        ('ckpt.json', 'ds_model')
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = text(value)
        if not path:
            raise InvalidValue("expected a path or a mapping, got an empty string")
        return path
    if _is_mapping(value):
        return mapping(value)
    raise InvalidValue(f"expected a path or a mapping describing the checkpoint, got {short_repr(value)}")


def model_config(value: Any) -> Any:
    """``config``/``args``: None, a mapping, or a config object with ``to_dict`` (HF ``PretrainedConfig``).

    Example:
        >>> model_config({"num_attention_heads": 8})
        {'num_attention_heads': 8}
    """
    if value is None:
        return None
    if _is_mapping(value):
        return mapping(value)
    if not isinstance(value, (str, bytes, type)) and callable(getattr(value, "to_dict", None)):
        return value
    raise InvalidValue(f"expected a mapping or a model config object (with to_dict()), got {short_repr(value)}")


def experts(value: Any) -> tuple:
    """``moe.moe_experts``: a non-empty list of expert counts (>= 1); a single int is a one-item list.

    Example:
        >>> experts([8]), experts(4)
        ((8,), (4,))
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidValue("expected a non-empty list of expert counts, got an empty list")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(positive_int(item))
            except InvalidValue as e:
                raise InvalidValue(problems=[(f"[{i}]", m) for _, m in e.problems]) from None
        return tuple(out)
    if isinstance(value, int) and not isinstance(value, bool):
        return (positive_int(value),)
    raise InvalidValue(f"expected a list of expert counts, got {short_repr(value)}")


# -- live objects --------------------------------------------------------------------------------------

def _is_plain_data(value: Any) -> bool:
    plain = (str, bytes, int, float, bool, list, tuple, dict, set, torch.Tensor, torch.dtype, os.PathLike)
    return isinstance(value, plain) or _is_mapping(value)


def process_group(value: Any) -> Any:
    """None or a live object (a ``torch.distributed`` process group); plain data is rejected.

    Example:
        >>> process_group(None) is None
        True
    """
    if value is None:
        return None
    if _is_plain_data(value) or isinstance(value, type):
        raise InvalidValue(f"expected a process group object (or None), got {short_repr(value)}")
    return value


def mpu(value: Any) -> Any:
    """None or a Megatron-style model-parallel unit (has ``get_model_parallel_group`` or the tensor variant).

    Example:
        >>> class Mpu:
        ...     def get_model_parallel_group(self): return None
        >>> mpu(Mpu()) is not None
        True
    """
    if value is None:
        return None
    if _is_plain_data(value) or isinstance(value, type):
        raise InvalidValue(f"expected a model-parallel unit object (or None), got {short_repr(value)}")
    if not any(callable(getattr(value, m, None))
               for m in ("get_model_parallel_group", "get_tensor_model_parallel_group")):
        raise InvalidValue(
            f"{short_repr(value)} has no get_model_parallel_group() or get_tensor_model_parallel_group() method"
        )
    return value


# -- injection_policy ----------------------------------------------------------------------------------

def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class.

    Example:
        >>> qualified_name(torch.nn.Linear)
        'torch.nn.modules.linear.Linear'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def _written(key: Any) -> str:
    if isinstance(key, type):
        return f"[{key.__name__}]"
    return f"[{bounded_repr(key, 200)}]" if type(key) is str else f"[{short_repr(key)}]"


def _is_qualified_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(p.isidentifier() or p == "<locals>" for p in parts)


def _layer_key(key: Any) -> Any:
    """A layer class (checked), or a :class:`ClassRef` for a qualified name (never imported)."""
    if isinstance(key, type):
        if not issubclass(key, torch.nn.Module):
            raise InvalidValue(f"{qualified_name(key)} is not a torch.nn.Module subclass")
        return key
    if isinstance(key, ClassRef):
        key = key.qualname
    if type(key) is str:
        if not _is_qualified_name(key):
            raise InvalidValue(f"{bounded_repr(key, 200)} is not a qualified class name (expected "
                               "'package.module.Class'; it is matched against the model's classes at plan time, "
                               "never imported)")
        return ClassRef(key)
    raise InvalidValue(f"a key must be an nn.Module subclass or its qualified name, got {short_repr(key)}")


def _same_class(a: Any, b: Any) -> bool:
    if isinstance(a, ClassRef) and isinstance(b, type):
        return a.matches(b)
    if isinstance(b, ClassRef) and isinstance(a, type):
        return b.matches(a)
    return a == b


def _policy_value(value: Any, layer: Any) -> Any:
    if isinstance(value, Policy):
        described = value.layer if isinstance(value.layer, type) else None
        if isinstance(layer, type) and not value.matches(layer):
            raise InvalidValue(f"the Policy describes {value.qualified_name}, not {qualified_name(layer)}")
        if isinstance(layer, ClassRef) and described is not None and not layer.matches(described):
            raise InvalidValue(f"the Policy describes {value.qualified_name}, not {layer.qualname}")
        return value
    names: Sequence = (value,) if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        raise InvalidValue(
            "expected a row-parallel linear name, a list of them, or a policyinject.policy.Policy, "
            f"got {short_repr(value)}"
        )
    if not names:
        raise InvalidValue("expected at least one row-parallel linear name, got an empty list")
    bad = [n for n in names if type(n) is not str or not n.strip(".")]
    if bad:
        raise InvalidValue(f"row-parallel linear names must be non-empty strings, got {short_repr(bad[0])}")
    return tuple(names)


def injection_policy(value: Any) -> Optional[dict]:
    """``{LayerClass or 'pkg.mod.Class': 'row.name' | ('a.b', 'c.d') | Policy}`` -> ``{class or ClassRef: tuple | Policy}``.

    A string key is kept as a :class:`~policyinject.config.class_ref.ClassRef`: nothing is imported (no user
    code runs while a config is validated); it is matched against the model's classes at plan time. Every
    bad entry is reported under the key as written. An empty mapping is None.

    Example:
        >>> out = injection_policy({"torch.nn.TransformerEncoderLayer": "linear2"})
        >>> [(str(k), v) for k, v in out.items()]
        [('torch.nn.TransformerEncoderLayer', ('linear2',))]
    """
    if value is None:
        return None
    if not _is_mapping(value):
        raise InvalidValue(f"expected a mapping {{layer class: row-parallel names or Policy}}, got {short_repr(value)}")
    items = _items(value)
    if not items:
        return None
    out: dict = {}
    problems = []
    for key, entry in items:
        try:
            layer = _layer_key(key)
            twin = next((k for k in out if _same_class(k, layer)), None)
            if twin is not None:
                raise InvalidValue(f"is given more than once (it names the same class as {_written(twin)[1:-1]})")
            out[layer] = _policy_value(entry, layer)
        except InvalidValue as e:
            problems.extend((_written(key) + sub, message) for sub, message in e.problems)
    if problems:
        raise InvalidValue(problems=problems)
    return out


# -- quant.calibration ---------------------------------------------------------------------------------

def calibration_data(value: Any) -> Any:
    """``quant.calibration.data``: None (the packaged text), a text file path, a list/tuple of integer
    token-id tensors (stored as a tuple), or a callable returning an iterable of them.

    Example:
        >>> calibration_data(None), calibration_data("calib.txt"), len(calibration_data([torch.arange(4)]))
        (None, 'calib.txt', 1)
        >>> calibration_data([torch.ones(3)])
        Traceback (most recent call last):
        ...
        policyinject.config.errors.InvalidValue: item 0 must be an integer token-id tensor [seq] or [rows, seq], got a torch.float32 tensor of shape (3,)
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = text(value)
        if not path:
            raise InvalidValue("expected a text file path, got an empty string")
        return path
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidValue("expected at least one token-id tensor, got an empty list")
        for i, t in enumerate(value):
            if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dim() not in (1, 2):
                got = (f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                       else short_repr(t))
                raise InvalidValue(f"item {i} must be an integer token-id tensor [seq] or [rows, seq], got {got}")
        return tuple(value)
    if callable(value):
        return value
    raise InvalidValue("expected None (the packaged text), a text file path, a list of token-id tensors or a "
                       f"callable yielding them, got {short_repr(value)}")


def tokenizer(value: Any) -> Any:
    """``quant.calibration.tokenizer``: None, or a callable tokenizer (text -> ``{"input_ids": ...}``) or an
    object with ``encode``.

    Example:
        >>> tokenizer(None) is None, tokenizer(str.split) is str.split
        (True, True)
    """
    if value is None or callable(value) or callable(getattr(value, "encode", None)):
        return value
    raise InvalidValue(f"expected a tokenizer (callable, or with an encode() method), got {short_repr(value)}")


# -- dumpers -------------------------------------------------------------------------------------------

def dump_plain(value: Any) -> Any:
    """Scalars unchanged; tuples become lists; mappings and lists are dumped item by item.

    Example:
        >>> dump_plain((1, 2)), dump_plain({"a": (1,)})
        ([1, 2], {'a': [1]})
    """
    return jsonable(value)


def jsonable(value: Any) -> Any:
    """The JSON form of a plain value: dtypes become strings, live objects :data:`OMIT` (dropped from containers).

    Example:
        >>> jsonable({"x": torch.float16, "y": object(), "z": [1.0, None]})
        {'x': 'torch.float16', 'z': [1.0, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json.dumps writes NaN/Infinity; kept so nothing is lost silently
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if _is_mapping(value):
        out = {}
        for k, v in value.items():
            dumped = jsonable(v)
            if isinstance(k, str) and dumped is not OMIT:
                out[k] = dumped
        return out
    if isinstance(value, (list, tuple)):
        return [d for d in (jsonable(v) for v in value) if d is not OMIT]
    return OMIT


def dump_object(value: Any) -> Any:
    """Live objects have no JSON form: None stays None, anything else is omitted.

    Example:
        >>> dump_object(None), dump_object(object())
        (None, OMIT)
    """
    return None if value is None else OMIT


def dump_path_or_object(value: Any) -> Any:
    """A path (or None) as itself; a live object (tensors, a callable) is omitted.

    Example:
        >>> dump_path_or_object("a.txt"), dump_path_or_object((torch.arange(2),))
        ('a.txt', OMIT)
    """
    return value if value is None or isinstance(value, str) else OMIT


def dump_model_config(value: Any) -> Any:
    """A mapping is dumped as JSON; a config object is omitted (see docs/config.md).

    Example:
        >>> dump_model_config({"n_head": 2})
        {'n_head': 2}
    """
    if value is None or _is_mapping(value):
        return jsonable(value)
    return OMIT


def dump_injection_policy(value: Optional[dict]) -> Any:
    """Classes become qualified names (a name as written stays as written), name tuples lists; ``Policy``
    entries are omitted.

    Example:
        >>> dump_injection_policy({torch.nn.TransformerEncoderLayer: ("linear2",)})
        {'torch.nn.modules.transformer.TransformerEncoderLayer': ['linear2']}
    """
    if value is None:
        return None
    return {_key_name(key): list(v) for key, v in value.items() if not isinstance(v, Policy)}


def _key_name(key: Any) -> str:
    return key.qualname if isinstance(key, ClassRef) else qualified_name(key)
