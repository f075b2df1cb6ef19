"""Hook specifications of the ``policyinject`` plugin system (pluggy project name ``policyinject``).

A plugin is a module (or object) with functions marked ``@hookimpl``; it is found through the
``policyinject`` entry-point group, exactly like the built-in plugins under ``plugins/``.

Example:
    >>> import pluggy
    >>> from policyinject.hooks import hookimpl, PolicyInjectSpec
    >>> class MyPlugin:
    ...     @hookimpl
    ...     def policyinject_register_policies(self, register):
    ...         register_calls.append(register)
    >>> register_calls = []
    >>> pm = pluggy.PluginManager("policyinject"); pm.add_hookspecs(PolicyInjectSpec)
    >>> _ = pm.register(MyPlugin(), name="mine")
    >>> _ = pm.hook.policyinject_register_policies(register=print)
    >>> register_calls == [print]
    True
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pluggy

PROJECT_NAME = "policyinject"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class PolicyInjectSpec:
    """The hooks a plugin may implement."""

    @hookspec
    def policyinject_register_policies(self, register: Callable[[Any], None]) -> None:
        """Call ``register(policy)`` for each :class:`Policy` or :class:`ModelPolicy` the plugin provides."""

    @hookspec(firstresult=True)
    def policyinject_select_policy(self, module: Any, path: str, candidates: list) -> Optional[Any]:
        """Pick the policy for ``module`` at ``path`` among several candidates; None lets others decide."""
