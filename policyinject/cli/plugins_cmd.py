"""``policyinject plugins``: list installed plugins, highest precedence first: version, origin, what each
registers, and which policies win or lose when two plugins register one for the same class.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> add_parser(sub)  # doctest: +ELLIPSIS
    ArgumentParser(prog='... plugins', ...)
"""

from __future__ import annotations

import argparse
import json

from .._plugin_manager import PluginManager


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``plugins`` (``--json`` for machine-readable output)."""
    parser = subparsers.add_parser("plugins", help="list installed plugins, what they register, which one wins")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the plugins of :meth:`PluginManager.default` as a table or JSON."""
    infos = PluginManager.default().plugins()
    if args.json:
        print(json.dumps([
            {"name": i.name, "key": i.key, "distribution": i.distribution, "version": i.version,
             "module": i.module, "origin": i.origin, "builtin": i.builtin, "registers": list(i.registers),
             "wins": list(i.wins), "loses": list(i.loses)}
            for i in infos
        ], indent=2))
        return 0
    rows = [("plugin", "distribution", "version", "registers")]
    for i in infos:
        rows.append((i.name, f"{i.distribution} ({i.origin})", i.version, ", ".join(i.registers) or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    print(f"\n{len(infos)} plugins, highest precedence first")
    outcomes = [(i, w, "wins") for i in infos for w in i.wins] + [(i, lo, "loses") for i in infos for lo in i.loses]
    if outcomes:
        print("\nconflicts (two plugins register a policy for the same class):")
        for i, text, verb in outcomes:
            print(f"  {i.name} ({i.distribution}) {verb} {text}")
    return 0
