"""``load_config``: one entry point from whatever the user has to a validated :class:`InferenceConfig`.

``config`` may be None, a mapping, a path (str or ``pathlib.Path``) to a ``.json``/``.yaml``/``.yml`` file,
or an :class:`InferenceConfig`; keyword arguments are merged in. A key given in both with different values
is an error, with the same value it is fine (DeepSpeed's rule); keys are compared after aliases and
deprecated keys are resolved, leaf by leaf (``tp={"tp_size": 2}`` in the file and
``tensor_parallel={"tp_grain_size": 32}`` as a keyword merge). For an :class:`InferenceConfig` only its
non-default values count as given.

Every problem is raised together as one :class:`ConfigError`, with paths as the user spelled them;
nothing but ``ConfigError`` escapes for bad input.

Example:
    >>> cfg = load_config({"tp": {"tp_size": 2}}, dtype="bf16", max_tokens=2048)
    >>> cfg.tensor_parallel.tp_size, cfg.dtype, cfg.max_out_tokens
    (2, 'bf16', 2048)
    >>> load_config({"tp": {"tp_size": 2}}, tensor_parallel={"tp_size": 4})
    Traceback (most recent call last):
    ...
    policyinject.config.errors.ConfigError: tensor_parallel.tp_size: the keyword arguments give 4, but the config gives 2 (as `tp.tp_size`)
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Union

import attrs

from .checks import check_explicit, inert_warnings, unsupported_warnings
from .converter import structure_config
from .errors import ConfigError, ConfigWarning, InvalidValue, Problem, short_repr
from .files import config_path, read_config_file
from .inputs import safe_text
from .keys import SPECS, section_specs
from .model import InferenceConfig
from .normalize import Normalized, from_settings, normalize

ConfigSource = Union[None, dict, str, "os.PathLike[str]", InferenceConfig]


@attrs.frozen
class LoadResult:
    """A validated config and the warnings found while loading it (not yet emitted)."""

    config: InferenceConfig
    warnings: tuple = ()


def _non_defaults(obj: Any, section: str, out: dict) -> dict:
    for spec in section_specs(section):
        if not spec.field:
            continue
        value = getattr(obj, spec.name)
        if spec.section:
            _non_defaults(value, spec.path, out)
        elif not _same(spec.path, value, spec.default):
            out[spec.path] = value
    return out


def _source(config: Any) -> "tuple[Normalized, str]":
    if config is None:
        return Normalized(), "the config"
    if issubclass(type(config), InferenceConfig):
        return from_settings(_non_defaults(config, "", {})), "the InferenceConfig"
    if issubclass(type(config), (str, os.PathLike)):  # type(): no user __class__ / __instancecheck__ runs
        path = config_path(config)
        data = read_config_file(path)
        name = f"config file {short_repr(str(path), 200, typed=False)}"
        if type(data) is not dict:
            raise ConfigError(Problem("", f"{name}: expected a mapping at the top level, got {short_repr(data)}"))
        return normalize(data), name
    if _looks_like_mapping(config):
        return normalize(config), "the config"
    raise ConfigError(Problem(
        "config",
        f"expected None, a mapping, a path to a .json/.yaml file or an InferenceConfig, got {short_repr(config)}",
    ))


def _looks_like_mapping(value: Any) -> bool:
    try:
        return isinstance(value, dict) or callable(getattr(type(value), "items", None))
    except Exception:  # a metaclass that misbehaves
        return False


def _equal(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # tensors, objects whose __eq__ raises
        return False


def _same(path: str, a: Any, b: Any) -> bool:
    """Equal after both values are converted the way the key converts them."""
    convert = SPECS[path].convert
    if convert is not None:
        try:
            return _equal(convert(a), convert(b))
        except InvalidValue:
            pass
        except Exception:  # defensive: a converter meeting a misbehaving object
            pass
    return _equal(a, b)


def _merge(first: Normalized, first_name: str, second: Normalized, second_name: str,
           override: bool = False) -> Normalized:
    """Both sources' settings; a key in both with different values is a problem, or, with ``override``,
    takes ``second``'s value."""
    out = Normalized(
        settings=dict(first.settings),
        spellings={**second.spellings, **first.spellings},
        problems=first.problems + second.problems,
        warnings=first.warnings + second.warnings,
    )
    for path, setting in second.settings.items():
        old = out.settings.get(path)
        if old is None or override:
            out.settings[path] = setting
            out.spellings[path] = setting.spelled
        elif not _same(path, old.value, setting.value):
            how = "" if old.spelled == setting.spelled else f" (as `{old.spelled}`)"
            out.problems.append(Problem(
                setting.spelled,
                f"{second_name} give {short_repr(setting.value, typed=False)}, but {first_name} gives "
                f"{short_repr(old.value, typed=False)}{how}",
            ))
    return out


def _tree(settings: dict) -> dict:
    tree: dict = {}
    for path, setting in settings.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = setting.value
    return tree


class _Speller:
    """Respells canonical paths (and backticked paths inside messages) the way the user wrote them."""

    def __init__(self, spellings: dict) -> None:
        self.spellings = spellings

    def path(self, path: str) -> str:
        base, sep, rest = path.partition("[")
        parts = base.split(".") if base else []
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.spellings:
                spelled = ".".join([self.spellings[prefix], *parts[i:]])
                return spelled + sep + rest
        return path

    def message(self, message: str) -> str:
        return re.sub(r"`([^`]+)`", lambda m: f"`{self.path(m.group(1))}`" if m.group(1) in SPECS else m.group(0),
                      message)

    def problem(self, p: Problem) -> Problem:
        return Problem(self.path(p.path), self.message(p.message))

    def warning(self, w: ConfigWarning) -> ConfigWarning:
        return ConfigWarning(w.category, self.path(w.path), self.message(w.message))


def parse_config(config: ConfigSource = None, **kwargs: Any) -> LoadResult:
    """Like :func:`load_config`, but return the warnings instead of emitting them.

    Example:
        >>> r = parse_config({"mp_size": 2})
        >>> r.config.tensor_parallel.tp_size, [str(w) for w in r.warnings]
        (2, ['`mp_size` is deprecated; use `tensor_parallel.tp_size` instead (its value was moved there)'])
    """
    return _guarded_parse(config, kwargs, override=False)


def parse_config_overriding(config: ConfigSource, overrides: Any) -> LoadResult:
    """Like :func:`parse_config`, but a key of ``overrides`` (a mapping) replaces the same key of ``config``
    instead of conflicting with it; keys are compared after aliases and deprecated keys are resolved, so
    ``{"tp": {"tp_size": 2}}`` or ``{"mp_size": 2}`` overrides a file's ``tensor_parallel.tp_size``. What the
    command line's ``--set`` does on top of ``--config``.

    Example:
        >>> r = parse_config_overriding({"kernel_inject": True, "tp": {"tp_grain_size": 32}},
        ...                             {"replace_with_kernel_inject": False, "tensor_parallel": {"tp_size": 2}})
        >>> r.config.replace_with_kernel_inject, r.config.tensor_parallel.tp_size, r.config.tensor_parallel.tp_grain_size
        (False, 2, 32)
    """
    return _guarded_parse(config, overrides, override=True)


def _guarded_parse(config: Any, kwargs: Any, override: bool) -> LoadResult:
    try:
        return _parse(config, kwargs, override)
    except ConfigError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # backstop: an object in the input misbehaved in a way no rule above anticipated
        raise ConfigError(Problem("", f"the configuration could not be validated: an object in it raised "
                                      f"{type(e).__name__}: {safe_text(e)}")) from None


def _parse(config: Any, kwargs: Any, override: bool = False) -> LoadResult:
    source, name = _source(config)
    merged = _merge(source, name, normalize(kwargs), "the keyword arguments", override) if kwargs else source
    speller = _Speller(merged.spellings)
    problems = list(merged.problems)
    explicit = {path: s.value for path, s in merged.settings.items()}
    problems += [speller.problem(p) for p in check_explicit(explicit)]
    cfg, found = structure_config(_tree(merged.settings))
    problems += [speller.problem(p) for p in found]
    found_warnings = list(merged.warnings)
    if cfg is not None:
        found_warnings += [speller.warning(w) for w in unsupported_warnings(cfg) + inert_warnings(cfg, explicit)]
    if problems or cfg is None:
        raise ConfigError(problems or [Problem("", "invalid configuration")], found_warnings)
    return LoadResult(cfg, tuple(found_warnings))


def load_config(config: ConfigSource = None, **kwargs: Any) -> InferenceConfig:
    """Load, normalise and validate an inference configuration.

    ``config``: None, a mapping, a path to a ``.json``/``.yaml``/``.yml`` file, or an
    :class:`InferenceConfig`; ``kwargs`` are merged in (the model-config key ``config`` can be given as a
    keyword only through its alias ``args``). Deprecated keys give a ``DeprecationWarning``, keys whose
    value cannot be honoured a ``UserWarning``; every problem raises one :class:`ConfigError`.

    Example:
        >>> cfg = load_config(dtype="float16", kernel_inject=True, tp={"tp_size": 2})
        >>> cfg.dtype, cfg.replace_with_kernel_inject, cfg.tensor_parallel.tp_size
        ('fp16', True, 2)
        >>> load_config(cfg) == cfg and load_config(cfg.to_dict()) == cfg
        True
        >>> load_config({"tensor_paralel": {"tp_size": 2}, "tp": {"tp_size": 0}})
        Traceback (most recent call last):
        ...
        policyinject.config.errors.ConfigError: tensor_paralel: unknown key `tensor_paralel`; did you mean `tensor_parallel`?
        tp.tp_size: must be >= 1, got 0
    """
    try:
        result = parse_config(config, **kwargs)
    except ConfigError as e:
        for w in e.warnings:
            warnings.warn(w.message, w.category, stacklevel=2)
        raise
    for w in result.warnings:
        warnings.warn(w.message, w.category, stacklevel=2)
    return result.config
