"""One plugin manager for built-in and third-party plugins, loaded through the same entry-point path.

Built-in plugins live in ``plugins/`` (importable as ``policyinject_plugins``) and are declared in this
project's own ``pyproject.toml`` under ``[project.entry-points.policyinject]``; a third-party package does
exactly the same. Plugins can be disabled with the environment variable ``POLICYINJECT_DISABLE_PLUGINS``:
a comma-separated list of entry-point names, ``external`` (every plugin not shipped with policyinject) or
``all``.

Example:
    >>> from policyinject.plugins import PluginManager
    >>> pm = PluginManager.empty()
    >>> from policyinject.policy import Policy
    >>> import torch
    >>> class Block(torch.nn.Module): pass
    >>> class P:
    ...     @staticmethod
    ...     @hookimpl
    ...     def policyinject_register_policies(register):
    ...         register(Policy(layer=Block, styles={"fc": "row"}))
    >>> pm.register(P, name="inline")
    >>> [p.layer_name for p in pm.collect().layer_policies]
    ['Block']
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Iterable, Mapping, Optional

import attrs
import pluggy

from .errors import PluginError
from .hooks import PROJECT_NAME, PolicyInjectSpec, hookimpl  # noqa: F401  (hookimpl re-exported for docs)
from .policy import ModelPolicy, Policy

ENTRY_POINT_GROUP = "policyinject"
DISABLE_ENV = "POLICYINJECT_DISABLE_PLUGINS"
OWN_DISTRIBUTION = "policyinject"


@attrs.frozen
class PluginInfo:
    """What ``policyinject plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    module: str
    builtin: bool
    registers: tuple = ()


@attrs.frozen
class PolicySet:
    """Every policy the plugins registered, in registration order."""

    layer_policies: tuple = ()
    model_policies: tuple = ()


def disabled_names(environ: Optional[Mapping[str, str]] = None) -> frozenset:
    """Parse ``POLICYINJECT_DISABLE_PLUGINS``.

    Example:
        >>> sorted(disabled_names({"POLICYINJECT_DISABLE_PLUGINS": "llama, external"}))
        ['external', 'llama']
    """
    raw = (environ if environ is not None else os.environ).get(DISABLE_ENV, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


class PluginManager:
    """Loads plugins and collects the policies they register. One per ``init_inference`` call or CLI run."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(PolicyInjectSpec)
        self._info: dict = {}

    @classmethod
    def empty(cls) -> "PluginManager":
        """A manager with no plugins loaded (tests register inline plugins on it)."""
        return cls()

    @classmethod
    def default(cls, environ: Optional[Mapping[str, str]] = None) -> "PluginManager":
        """A manager with every enabled entry-point plugin loaded (built-in and third-party)."""
        pm = cls()
        pm.load_entry_points(environ)
        return pm

    @property
    def hook(self) -> Any:
        return self._pm.hook

    def register(self, plugin: Any, name: str, info: Optional[PluginInfo] = None) -> None:
        """Register a plugin object or module under ``name`` (the pluggy way)."""
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validation errors
            where = f" from distribution {info.distribution!r}" if info else ""
            raise PluginError(f"plugin {name!r}{where} could not be registered: {exc}") from exc
        self._info[name] = info or PluginInfo(name, "(inline)", "", getattr(plugin, "__name__", repr(plugin)), False)

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._info.pop(name, None)

    def load_entry_points(self, environ: Optional[Mapping[str, str]] = None) -> None:
        """Import and register every enabled plugin of the ``policyinject`` entry-point group."""
        disabled = disabled_names(environ)
        if "all" in disabled:
            return
        for ep, dist_name, version in _entry_points():
            builtin = dist_name == OWN_DISTRIBUTION
            if ep.name in disabled or (not builtin and "external" in disabled) or ep.name in self._info:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}) from distribution {dist_name!r} {version} failed to load: "
                    f"{type(exc).__name__}: {exc}. Disable it with {DISABLE_ENV}={ep.name}"
                ) from exc
            info = PluginInfo(ep.name, dist_name, version, ep.value, builtin)
            self.register(plugin, ep.name, info)

    def plugins(self) -> list:
        """Info on every registered plugin, with what each one registers."""
        out = []
        for name, info in self._info.items():
            plugin = self._pm.get_plugin(name)
            policies = self._collect_from(plugin, name) if plugin is not None else []
            registers = tuple(_describe(p) for p in policies)
            out.append(attrs.evolve(info, registers=registers))
        return out

    def collect(self) -> PolicySet:
        """Call every plugin's ``policyinject_register_policies`` and gather the results."""
        layer: list = []
        model: list = []
        for name in list(self._info):
            plugin = self._pm.get_plugin(name)
            if plugin is None:
                continue
            for obj in self._collect_from(plugin, name):
                (layer if isinstance(obj, Policy) else model).append(obj)
        return PolicySet(tuple(layer), tuple(model))

    def _collect_from(self, plugin: Any, name: str) -> list:
        impl = getattr(plugin, "policyinject_register_policies", None)
        if impl is None:
            return []
        found: list = []
        info = self._info.get(name)

        def register(obj: Any) -> None:
            if isinstance(obj, (Policy, ModelPolicy)):
                source = obj.source or f"plugin {name}"
                found.append(obj.with_source(source))
                return
            dist = f" (distribution {info.distribution!r})" if info else ""
            raise PluginError(
                f"plugin {name!r}{dist} registered {obj!r}: expected a policyinject Policy or ModelPolicy"
            )

        try:
            impl(register=register)
        except PluginError:
            raise
        except Exception as exc:
            dist = f" from distribution {info.distribution!r}" if info else ""
            raise PluginError(
                f"plugin {name!r}{dist} failed in policyinject_register_policies: {type(exc).__name__}: {exc}"
            ) from exc
        return found

    def select_policy(self, module: Any, path: str, candidates: list) -> Optional[Any]:
        return self._pm.hook.policyinject_select_policy(module=module, path=path, candidates=candidates)


def _entry_points() -> Iterable[tuple]:
    seen = set()
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            key = (dist.metadata["Name"], ep.name)
            if key in seen:
                continue
            seen.add(key)
            yield ep, (dist.metadata["Name"] or "?"), dist.version


def _describe(obj: Any) -> str:
    if isinstance(obj, Policy):
        return f"layer {obj.layer_name}"
    return f"model {obj.model_name}"
