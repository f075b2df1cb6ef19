"""Reading a ``.json`` / ``.yaml`` / ``.yml`` config file: bounded, duplicate keys rejected, no code run.

:func:`read_config_file` raises :class:`ConfigError` and nothing else for any file:

- a file over :data:`MAX_FILE_BYTES` (JSON) or :data:`MAX_YAML_BYTES` (YAML, whose parser is ~10x
  slower) is rejected before it is parsed;
- a key given twice in one mapping is rejected, naming the key, its dotted path and (YAML) the lines
  (DeepSpeed's loader does the same with ``dict_raise_error_on_duplicate_keys``); YAML merge keys
  (``<<: *base``) are allowed to be overridden, as YAML intends;
- YAML is read with the safe loader (plain data only: no Python tags, no object construction);
  ``<<`` merges are bounded, and aliases are expanded by nothing here: the walk that follows
  (:func:`policyinject.config.inputs.plain_copy`) stops at :data:`MAX_NODES` values;
- nesting deeper than :data:`MAX_DEPTH` (or than the parser allows) is rejected.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
    >>> _ = p.write_text('{"tp": {"tp_size": 2, "tp_size": 4}}')
    >>> read_config_file(p)
    Traceback (most recent call last):
    ...
    policyinject.config.errors.ConfigError: tp.tp_size: is given twice in config file '...c.json'; give each key once
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from .errors import ConfigError, Problem
from .inputs import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, bounded_repr, key_text, plain_copy, safe_text

#: Largest YAML config file read (bytes). PyYAML (even with libyaml) parses about 1 MB per second.
MAX_YAML_BYTES = 1024 * 1024


def _file_error(name: str, message: str) -> ConfigError:
    return ConfigError(Problem("", f"config file {name}: {message}"))


def config_path(path: Any) -> Path:
    """``path`` (str or path-like) as a :class:`Path`; a :class:`ConfigError` for a NUL byte or a bad path-like.

    Example:
        >>> config_path("a/b.json").name
        'b.json'
        >>> config_path("a\\0.json")
        Traceback (most recent call last):
        ...
        policyinject.config.errors.ConfigError: config: the path 'a\\x00.json' contains a NUL byte
    """
    try:
        text = os.fspath(path)
    except Exception as e:
        raise ConfigError(Problem("config", f"the path-like object cannot be read: {safe_text(e)}")) from None
    if type(text) is not str:
        text_repr = bounded_repr(text, 80)
        raise ConfigError(Problem("config", f"expected a str path (or a mapping), got {text_repr}")) from None
    if "\0" in text:
        raise ConfigError(Problem("config", f"the path {bounded_repr(text, 80)} contains a NUL byte"))
    return Path(text)


def read_config_file(path: Union[str, "os.PathLike[str]"]) -> Any:
    """Parse a ``.json``, ``.yaml`` or ``.yml`` file; an empty YAML file is ``{}``. Raises ``ConfigError``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = p.write_text("tp:\\n  tp_size: 2\\n")
        >>> read_config_file(p)
        {'tp': {'tp_size': 2}}
    """
    p = config_path(path)
    name = bounded_repr(str(p), 200)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise _file_error(name, "expected a .json, .yaml or .yml file")
    limit = MAX_FILE_BYTES if suffix == ".json" else MAX_YAML_BYTES
    try:
        with open(p, "rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise _file_error(name, "not found") from None
    except (OSError, ValueError) as e:
        raise _file_error(name, f"cannot be read: {safe_text(e)}") from None
    if len(raw) > limit:
        raise _file_error(name, f"is larger than {limit:,} bytes; a configuration is never that large")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _file_error(name, f"is not UTF-8 text: {safe_text(e)}") from None
    duplicates: dict = {}  # id(mapping) -> [(key, where)]
    try:
        data = _parse_json(content, duplicates) if suffix == ".json" else _parse_yaml(content, duplicates)
    except ConfigError:
        raise
    except RecursionError:
        raise _file_error(name, f"is nested too deeply (more than {MAX_DEPTH} levels are never needed)") from None
    except ValueError as e:  # json.JSONDecodeError, an int too long to convert
        raise _file_error(name, f"is not valid JSON: {safe_text(e, 300)}") from None
    except Exception as e:  # yaml.YAMLError and friends
        raise _file_error(name, f"is not valid YAML: {safe_text(e, 300)}") from None
    if data is None and suffix != ".json":
        return {}
    problems = _duplicate_problems(data, duplicates, name) if duplicates else []
    _, found = plain_copy(data)  # the depth / size limits, checked on the file's own terms
    problems += [Problem(pr.path, f"{pr.message} (in config file {name})") for pr in found]
    if problems:
        raise ConfigError(problems)
    return data


def _parse_json(content: str, duplicates: dict) -> Any:
    def pairs(items: list) -> dict:
        out = dict(items)
        if len(out) != len(items):
            seen: set = set()
            dup = duplicates.setdefault(id(out), [])
            for key, _ in items:
                if key in seen:
                    dup.append((key, ""))
                seen.add(key)
        return out

    return json.loads(content, object_pairs_hook=pairs)


def _parse_yaml(content: str, duplicates: dict) -> Any:
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        """The safe loader, rejecting duplicate keys and bounding ``<<`` merges."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.merged = 0
            self.explicit: dict = {}  # id(node) -> its own (not merged) key nodes, taken before flattening
            self.node_dups: dict = {}  # id(node) -> [(key, lines)]

        def own_keys(self, node: Any) -> list:
            return self.explicit.setdefault(id(node), [k for k, _ in node.value if k.tag != _MERGE])

        def flatten_mapping(self, node: Any) -> None:
            self.own_keys(node)  # merged-in mappings are flattened through here too, before they change
            super().flatten_mapping(node)
            self.merged += len(node.value)
            if self.merged > MAX_NODES:
                raise ConfigError(Problem("", f"YAML merge keys (<<) expand to more than {MAX_NODES:,} entries"))

        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            own = self.own_keys(node)
            out = super().construct_mapping(node, deep=deep)
            seen: dict = {}
            for key_node in own:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        where = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                        self.node_dups.setdefault(id(node), []).append((key, where))
                    else:
                        seen[key] = line
                except TypeError:
                    continue  # an unhashable key: the constructor has already complained
            return out

        def construct_yaml_map(self, node: Any) -> Any:
            data: dict = {}
            yield data
            data.update(self.construct_mapping(node))
            if id(node) in self.node_dups:
                duplicates[id(data)] = self.node_dups[id(node)]

    Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_yaml_map)
    loader = Loader(content)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_MERGE = "tag:yaml.org,2002:merge"


def _duplicate_problems(data: Any, duplicates: dict, name: str) -> list:
    """One problem per duplicated key, at its dotted path (found by walking ``data`` for the mappings)."""
    problems = []
    stack = [(data, "", 0)]
    seen: set = set()
    while stack and len(seen) < MAX_NODES:
        value, path, depth = stack.pop()
        if type(value) is dict:
            if id(value) in seen or depth > MAX_DEPTH:
                continue
            seen.add(id(value))
            for key, where in duplicates.get(id(value), ()):
                at = f" ({where})" if where else ""
                problems.append(Problem(key_text(key, path), f"is given twice in config file {name}{at}; give each key once"))
            stack.extend((v, key_text(k, path), depth + 1) for k, v in reversed(list(value.items())))
        elif type(value) is list:
            if id(value) in seen or depth > MAX_DEPTH:
                continue
            seen.add(id(value))
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in reversed(list(enumerate(value))))
    return problems
