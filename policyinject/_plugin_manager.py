"""The plugin manager: built-in and third-party plugins, loaded through the same entry-point group.

Built-in plugins live in ``plugins/`` (importable as ``policyinject_plugins``) and are declared in this
project's ``pyproject.toml`` under ``[project.entry-points.policyinject]``; a third-party package does
exactly the same. A plugin is a module, a class (instantiated without arguments) or an instance with
``@hookimpl`` functions; hooks are called through pluggy, so ``tryfirst`` / ``trylast`` order them.

When several plugins register a policy for the same layer (or model) class, one wins by a fixed precedence
(see :func:`precedence_reason` and ``docs/plugins.md``) and a :class:`PluginConflictWarning` names both; one
plugin registering several different policies for a class without a ``policyinject_select_policy`` hook to
choose among them is a :class:`PluginConflictWarning` too (its first one is used).
Plugins can be disabled with ``POLICYINJECT_DISABLE_PLUGINS``: a comma-separated list of entry-point names
(``llama``), ``distribution:name`` (``my-dist:llama``), ``external`` (every plugin not shipped with
policyinject) or ``all``.

Example:
    >>> import torch
    >>> from policyinject import PluginManager, Policy, hookimpl
    >>> class Block(torch.nn.Module): pass
    >>> class MyPlugin:
    ...     @hookimpl
    ...     def policyinject_register_policies(self, register):
    ...         register(Policy(layer=Block, styles={"fc": "row"}))
    >>> pm = PluginManager.empty()
    >>> pm.register(MyPlugin, name="inline")
    >>> [p.layer_name for p in pm.collect().layer_policies]
    ['Block']
"""

from __future__ import annotations

import inspect
import os
import warnings
from importlib import metadata
from typing import Any, Iterable, Mapping, Optional

import attrs
import pluggy

from .errors import PluginError
from .hooks import PROJECT_NAME, PolicyInjectSpec
from .policy import ModelPolicy, Policy

ENTRY_POINT_GROUP = "policyinject"
DISABLE_ENV = "POLICYINJECT_DISABLE_PLUGINS"
OWN_DISTRIBUTION = "policyinject"
#: Where a plugin comes from, highest precedence first.
ORIGINS = ("code", "third-party", "built-in")
_IN_CODE = "(in code)"


class PluginConflictWarning(UserWarning):
    """Two plugins register a policy for the same class; the message says which one wins and why."""


@attrs.frozen
class PluginInfo:
    """What ``policyinject plugins`` shows for one plugin.

    ``name`` is the entry-point name (or the name given to :meth:`PluginManager.register`); ``key`` is the
    unique name it is registered under in pluggy (``distribution:name`` for third-party entry points).
    """

    name: str
    distribution: str
    version: str
    module: str
    origin: str
    key: str
    registers: tuple = ()
    wins: tuple = ()
    loses: tuple = ()

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"

    def label(self) -> str:
        """``'toy' (distribution policyinject-example-plugin 0.1.0)``."""
        if self.origin == "code":
            return f"{self.name!r} (registered in code)"
        version = f" {self.version}" if self.version else ""
        return f"{self.name!r} (distribution {self.distribution}{version})"


@attrs.frozen
class PolicyConflict:
    """Several plugins register a policy for the class ``target`` (qualified name); ``winner`` is used."""

    kind: str  # "layer" or "model"
    target: str
    winner: PluginInfo
    losers: tuple
    reasons: tuple  # one per loser

    def message(self) -> str:
        lines = [f"{self.kind} class {self.target}: plugin {self.winner.label()} wins over "
                 + ", ".join(f"plugin {lo.label()} ({why})" for lo, why in zip(self.losers, self.reasons))]
        if self.kind == "layer":
            lines.append("a policyinject_select_policy hook may still choose per module")
        lines.append(f"silence this by disabling one ({DISABLE_ENV}=distribution:name) or passing "
                     "injection_policy for the class")
        return "; ".join(lines)


@attrs.frozen
class RepeatedPolicies:
    """One plugin registers ``count`` different policies for the class ``target``; the first one is used."""

    kind: str  # "layer" or "model"
    target: str
    plugin: PluginInfo
    count: int
    #: Other plugins with a ``policyinject_select_policy`` hook (layer classes only): they may pick another.
    selectors: tuple = ()

    def message(self) -> str:
        used = "the first one it registered is used"
        if self.selectors:
            used += (" unless a policyinject_select_policy hook picks another per module (plugins with one: "
                     + ", ".join(s.label() for s in self.selectors) + ")")
        return (f"{self.kind} class {self.target}: plugin {self.plugin.label()} registers {self.count} different "
                f"policies for it; {used}; a plugin that registers variants on purpose chooses among them with "
                f"its own policyinject_select_policy hook")


@attrs.frozen
class PolicySet:
    """Every policy the plugins registered, highest precedence first, and the conflicts among plugins."""

    layer_policies: tuple = ()
    model_policies: tuple = ()
    conflicts: tuple = ()
    #: Classes one plugin registers several different policies for, without a select hook to choose.
    repeated: tuple = ()


def disabled_names(environ: Optional[Mapping[str, str]] = None) -> frozenset:
    """Parse ``POLICYINJECT_DISABLE_PLUGINS``.

    Example:
        >>> sorted(disabled_names({"POLICYINJECT_DISABLE_PLUGINS": "llama, external"}))
        ['external', 'llama']
    """
    raw = (environ if environ is not None else os.environ).get(DISABLE_ENV, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def precedence_reason(winner: PluginInfo, loser: PluginInfo, winner_first: bool, loser_last: bool) -> str:
    """Why ``winner``'s policy is used over ``loser``'s (both registered one for the same class).

    Example:
        >>> a = PluginInfo("llama", "acme-llama", "1.0", "acme.llama", "third-party", "acme-llama:llama")
        >>> b = PluginInfo("llama", "policyinject", "0.1.0", "policyinject_plugins.llama", "built-in", "llama")
        >>> precedence_reason(a, b, False, False)
        'third-party plugins take precedence over built-in plugins'
    """
    if winner.origin != loser.origin:
        names = {"code": "plugins registered in code", "third-party": "third-party plugins",
                 "built-in": "built-in plugins"}
        return f"{names[winner.origin]} take precedence over {names[loser.origin]}"
    if winner_first:
        return f"{winner.name!r} is marked tryfirst"
    if loser_last:
        return f"{loser.name!r} is marked trylast"
    if winner.origin == "code":
        return f"{winner.name!r} was registered later (pluggy calls the latest registration first)"
    return "same precedence otherwise: ordered by distribution name, then entry-point name"


class PluginManager:
    """Loads plugins and collects the policies they register. One per ``init_inference`` call or CLI run."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(PolicyInjectSpec)
        self._info: dict = {}
        self._rank: dict = {}  # id(policy) -> (rank, plugin key), for the last collect()
        self._collected: Optional[PolicySet] = None  # keeps the ids in _rank alive

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
        """Register a module, a class (instantiated without arguments) or an instance under ``name``.

        Without ``info`` the plugin counts as registered in code: it takes precedence over entry points.
        """
        info = info or PluginInfo(name, _IN_CODE, "", getattr(plugin, "__name__", type(plugin).__name__),
                                  "code", name)
        where = f"plugin {info.label()}" + (f" (entry point {info.module})" if info.origin != "code" else "")
        if info.key in self._info:
            raise PluginError(f"{where}: a plugin named {info.key!r} is already registered")
        if inspect.isclass(plugin):
            try:
                plugin = plugin()
            except Exception as exc:
                raise PluginError(f"{where}: the plugin class cannot be instantiated without arguments: "
                                  f"{type(exc).__name__}: {exc}") from exc
        try:
            self._pm.register(plugin, name=info.key)
            self._pm.check_pending()
        except Exception as exc:  # pluggy validation errors: wrong argument names, unknown hooks
            if self._pm.get_plugin(info.key) is not None:
                self._pm.unregister(name=info.key)
            raise PluginError(f"{where} could not be registered: {exc}") from exc
        self._info[info.key] = info

    def unregister(self, name: str) -> None:
        """Remove the plugin registered under ``name`` (its key)."""
        self._pm.unregister(name=name)
        self._info.pop(name, None)

    def load_entry_points(self, environ: Optional[Mapping[str, str]] = None) -> None:
        """Import and register every enabled plugin of the ``policyinject`` entry-point group.

        They are registered in a fixed order (distribution name, then entry-point name), so that pluggy
        calls them in that order within each origin; an entry point named like a built-in is registered
        beside it (as ``distribution:name``), never instead of it.
        """
        disabled = disabled_names(environ)
        if "all" in disabled:
            return
        found = sorted(_entry_points(), key=lambda e: (e[1], e[0].name))
        for ep, dist_name, version in reversed(found):  # pluggy calls the last registered first
            builtin = dist_name == OWN_DISTRIBUTION
            qualified = f"{dist_name}:{ep.name}"
            if ep.name in disabled or qualified in disabled or (not builtin and "external" in disabled):
                continue
            info = PluginInfo(ep.name, dist_name, version, ep.value, "built-in" if builtin else "third-party",
                              ep.name if builtin else qualified)
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {info.label()} failed to load entry point {ep.name} = {ep.value}: "
                    f"{type(exc).__name__}: {exc}. Disable it with {DISABLE_ENV}={qualified}"
                ) from exc
            self.register(plugin, ep.name, info)

    def plugins(self) -> list:
        """Info on every registered plugin, highest precedence first: what each registers, wins and loses."""
        collected = self.collect(warn=False)
        wins: dict = {}
        loses: dict = {}
        for c in collected.conflicts:
            for lo, why in zip(c.losers, c.reasons):
                wins.setdefault(c.winner.key, []).append((c.kind, c.target, lo, why))
                loses.setdefault(lo.key, []).append((c.kind, c.target, c.winner, why))
        out = []
        for key in self._ordered_keys():
            info = self._info[key]
            registers = tuple(_describe(p) for p in self._collect_from(key))
            out.append(attrs.evolve(
                info, registers=registers,
                wins=tuple(f"{k} {t}: over {o.label()} ({why})" for k, t, o, why in wins.get(key, [])),
                loses=tuple(f"{k} {t}: to {o.label()} ({why})" for k, t, o, why in loses.get(key, []))))
        return out

    def collect(self, warn: bool = True) -> PolicySet:
        """Call every plugin's ``policyinject_register_policies`` and gather the results by precedence.

        Layer policies of every plugin are kept (highest precedence first; :meth:`select_policy` picks among
        them per module); for a model class only the winning plugin's policies are kept. Each conflict
        between plugins is a :class:`PluginConflictWarning` (when ``warn``).
        """
        layer: list = []
        model: list = []
        self._rank = {}
        for rank, key in enumerate(self._ordered_keys()):
            for obj in self._collect_from(key):
                (layer if isinstance(obj, Policy) else model).append(obj)
                self._rank[id(obj)] = (rank, key)
        conflicts = self._conflicts("layer", layer) + self._conflicts("model", model)
        repeated = self._repeated("layer", layer) + self._repeated("model", model)
        losing = {(c.target, lo.key) for c in conflicts if c.kind == "model" for lo in c.losers}
        model = [p for p in model if (_target(p.model), self._rank[id(p)][1]) not in losing]
        self._collected = PolicySet(tuple(layer), tuple(model), tuple(conflicts), tuple(repeated))
        if warn:
            for c in [*conflicts, *repeated]:
                warnings.warn(c.message(), PluginConflictWarning, stacklevel=2)
        return self._collected

    def select_policy(self, module: Any, path: str, candidates: list) -> Optional[Any]:
        """Pick among the policies several plugins register for ``module``'s class.

        A ``policyinject_select_policy`` hook decides first; otherwise the highest-precedence one wins.
        """
        ranked = sorted(candidates, key=lambda p: self._rank.get(id(p), (len(self._info), ""))[0])
        chosen = self._pm.hook.policyinject_select_policy(module=module, path=path, candidates=ranked)
        return chosen if chosen is not None else (ranked[0] if ranked else None)

    # ------------------------------------------------------------------------------------------ internals
    def _hook_order(self) -> list:
        """Plugin keys in the order pluggy calls ``policyinject_register_policies`` (tryfirst/trylast)."""
        impls = self._pm.hook.policyinject_register_policies.get_hookimpls()
        return [impl.plugin_name for impl in reversed(impls)]

    def _ordered_keys(self) -> list:
        """Every plugin key, highest precedence first: origin, then pluggy's call order."""
        order = self._hook_order()
        position = {key: i for i, key in enumerate(order)}
        keys = list(self._info)
        return sorted(keys, key=lambda k: (ORIGINS.index(self._info[k].origin), position.get(k, len(order))))

    def _impl_flags(self, key: str) -> tuple:
        for impl in self._pm.hook.policyinject_register_policies.get_hookimpls():
            if impl.plugin_name == key:
                return impl.opts.get("tryfirst", False), impl.opts.get("trylast", False)
        return False, False

    def _conflicts(self, kind: str, policies: list) -> list:
        by_target: dict = {}
        for p in policies:
            key = self._rank[id(p)][1]
            owners = by_target.setdefault(_target(p.layer if kind == "layer" else p.model), [])
            if key not in owners:
                owners.append(key)
        out = []
        for target, owners in by_target.items():
            if len(owners) < 2:
                continue
            winner = self._info[owners[0]]
            first, _ = self._impl_flags(owners[0])
            reasons = tuple(precedence_reason(winner, self._info[k], first, self._impl_flags(k)[1])
                            for k in owners[1:])
            out.append(PolicyConflict(kind, target, winner, tuple(self._info[k] for k in owners[1:]), reasons))
        return out

    def _repeated(self, kind: str, policies: list) -> list:
        """Classes one plugin registers several different policies for. A layer plugin with a
        ``policyinject_select_policy`` hook registers variants on purpose (it picks one per module)."""
        by_owner: dict = {}
        for p in policies:
            key = self._rank[id(p)][1]
            group = by_owner.setdefault((_target(p.layer if kind == "layer" else p.model), key), [])
            if all(p != q for q in group):
                group.append(p)
        selects = [k for k in self._ordered_keys()
                   if k in {impl.plugin_name for impl in self._pm.hook.policyinject_select_policy.get_hookimpls()}]
        return [RepeatedPolicies(kind, target, self._info[key], len(group),
                                 tuple(self._info[k] for k in selects) if kind == "layer" else ())
                for (target, key), group in by_owner.items()
                if len(group) > 1 and not (kind == "layer" and key in selects)]

    def _collect_from(self, key: str) -> list:
        """Call one plugin's ``policyinject_register_policies`` through pluggy; its policies, sourced."""
        info = self._info[key]
        others = [p for k, p in self._pm.list_name_plugin() if k != key]
        caller = self._pm.subset_hook_caller("policyinject_register_policies", remove_plugins=others)
        found: list = []
        where = f"plugin {info.label()}" + (f" (entry point {info.module})" if info.origin != "code" else "")

        def register(obj: Any) -> None:
            if isinstance(obj, (Policy, ModelPolicy)):
                found.append(obj.with_source(obj.source or f"plugin {info.key}"))
                return
            raise PluginError(f"{where} registered {obj!r}: expected a policyinject Policy or ModelPolicy")

        try:
            caller(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"{where} failed in policyinject_register_policies: "
                              f"{type(exc).__name__}: {exc}") from exc
        return found


def _target(layer: Any) -> str:
    return layer if isinstance(layer, str) else f"{layer.__module__}.{layer.__qualname__}"


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
