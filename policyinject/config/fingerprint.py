"""A fingerprint of a normalised config, for checking that tensor-parallel ranks agree.

:func:`config_fingerprint` maps every canonical dotted key of an :class:`InferenceConfig` to a short,
stable digest of its value (the same value gives the same digest in every process, on every machine), and
:func:`diff_fingerprints` lists the keys whose digests differ. Ranks exchange fingerprints (plain strings:
small, picklable) and each rank can name every key that disagrees.

Keys left out (:data:`PER_RANK_KEYS`), because they may legitimately differ between ranks:

- the filesystem locations ``base_dir``, ``save_mp_checkpoint_path`` and the three ``checkpoint_config``
  keys: a node-local copy of the same checkpoint has another path on each node;
- ``tensor_parallel.setup_timeout_s``: how long a rank waits for the others changes no result;
- ``checkpoint`` when it is a path, for the same reason as the paths above; a checkpoint *description* (a mapping) is
  fingerprinted without its ``base_dir`` and with each file of ``checkpoints`` reduced to its base name.
  That the checkpoints hold the same tensors is for the model fingerprint (shapes) to check.

Live objects (``tensor_parallel.mpu``, ``tensor_parallel.tp_group``, ``moe.ep_group``,
``moe.ep_mp_group``) differ by identity in every process; they are fingerprinted by whether one is given and
its type name, so that one rank passing a group and another none is still caught. A ``Policy`` value of
``injection_policy`` is fingerprinted by its ``repr`` with memory addresses removed; a model-config object by
its ``to_dict()``.

Example:
    >>> from policyinject.config import load_config
    >>> a = config_fingerprint(load_config(tp={"tp_size": 2, "tp_grain_size": 64}))
    >>> b = config_fingerprint(load_config(tp={"tp_size": 2, "tp_grain_size": 32}, base_dir="/node1/ckpt"))
    >>> diff_fingerprints(a, b)
    ['tensor_parallel.tp_grain_size']
    >>> "base_dir" in a, len(a["tensor_parallel.tp_size"])
    (False, 16)
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from types import MappingProxyType
from typing import Any, Mapping

from .checks import _leaves
from .class_ref import ClassRef
from .values import OMIT, jsonable

#: Keys never fingerprinted: paths that may differ per node (see the module docstring).
PER_RANK_KEYS = frozenset({
    "base_dir", "save_mp_checkpoint_path", "checkpoint_config.checkpoint_dir",
    "checkpoint_config.save_mp_checkpoint_path", "checkpoint_config.base_dir",
    "tensor_parallel.setup_timeout_s",
})
_LIVE_KEYS = frozenset({"tensor_parallel.mpu", "tensor_parallel.tp_group", "moe.ep_group", "moe.ep_mp_group"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def _digest(form: Any) -> str:
    text = json.dumps(form, sort_keys=True, separators=(",", ":"), allow_nan=True, default=_fallback)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _fallback(obj: Any) -> str:
    return _ADDRESS.sub("", f"<{type(obj).__module__}.{type(obj).__qualname__}>")


def _type_of(value: Any) -> str:
    return "None" if value is None else f"<{type(value).__module__}.{type(value).__qualname__}>"


def _form(path: str, value: Any) -> Any:
    """The JSON-able form of one key's value that is compared across ranks."""
    if path in _LIVE_KEYS:
        return _type_of(value)
    if path == "checkpoint":
        if not isinstance(value, Mapping):
            return None if value is None else "<a path>"
        described = {k: v for k, v in value.items() if k != "base_dir"}
        files = described.get("checkpoints")
        if isinstance(files, (list, tuple)):
            described["checkpoints"] = [posixpath.basename(str(f).replace("\\", "/")) for f in files]
        return jsonable(described)
    if path == "injection_policy" and value is not None:
        return sorted(
            [key.qualname if isinstance(key, ClassRef) else f"{key.__module__}.{key.__qualname__}",
             list(entry) if isinstance(entry, tuple) else _ADDRESS.sub("", repr(entry))]
            for key, entry in value.items()
        )
    if path == "config" and value is not None and not isinstance(value, Mapping):
        try:
            return {"type": _type_of(value), "to_dict": jsonable(value.to_dict())}
        except Exception:
            return _type_of(value)
    dumped = jsonable(value)
    return _type_of(value) if dumped is OMIT else dumped


def config_fingerprint(config: Any) -> Mapping[str, str]:
    """``{canonical dotted key: 16-hex-digit digest of its value}`` for every key but :data:`PER_RANK_KEYS`.

    Pure: the same config gives the same mapping in any process (no ids, no addresses, sorted JSON).

    Example:
        >>> from policyinject.config import InferenceConfig
        >>> fp = config_fingerprint(InferenceConfig(dtype="bf16"))
        >>> fp["dtype"] == config_fingerprint(InferenceConfig(dtype="bfloat16"))["dtype"]
        True
        >>> sorted(fp)[:3]
        ['checkpoint', 'config', 'cuda_graph_cache_size']
    """
    out = {}
    for path, value in _leaves(config, ""):
        if path in PER_RANK_KEYS:
            continue
        out[path] = _digest(_form(path, value))
    return MappingProxyType(dict(sorted(out.items())))


def config_values(config: Any, limit: int = 60) -> Mapping[str, str]:
    """``{canonical dotted key: the compared form of its value as short text}`` (the keys of
    :func:`config_fingerprint`), for error messages that show which rank had which value.

    Example:
        >>> from policyinject.config import load_config
        >>> config_values(load_config(tp={"tp_size": 2, "tp_grain_size": 32}))["tensor_parallel.tp_grain_size"]
        '32'
    """
    out = {}
    for path, value in _leaves(config, ""):
        if path in PER_RANK_KEYS:
            continue
        text = json.dumps(_form(path, value), sort_keys=True, allow_nan=True, default=_fallback)
        out[path] = text if len(text) <= limit else text[:limit - 3] + "..."
    return MappingProxyType(dict(sorted(out.items())))


def diff_fingerprints(a: Mapping[str, str], b: Mapping[str, str]) -> list:
    """The dotted keys whose digests differ between two fingerprints (or that only one has), sorted.

    Example:
        >>> diff_fingerprints({"dtype": "aa", "tensor_parallel.tp_size": "bb"},
        ...                   {"dtype": "aa", "tensor_parallel.tp_size": "cc", "extra": "dd"})
        ['extra', 'tensor_parallel.tp_size']
    """
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
