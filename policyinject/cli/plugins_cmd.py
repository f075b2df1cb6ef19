"""``policyinject plugins``: list installed plugins, their versions and what each registers.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> add_parser(sub)  # doctest: +ELLIPSIS
    ArgumentParser(prog='... plugins', ...)
"""

from __future__ import annotations

import argparse
import json

from ..plugins import PluginManager


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser("plugins", help="list installed plugins and what they register")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    infos = PluginManager.default().plugins()
    if args.json:
        print(json.dumps([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "module": i.module,
             "builtin": i.builtin, "registers": list(i.registers)}
            for i in infos
        ], indent=2))
        return 0
    rows = [("plugin", "distribution", "version", "registers")]
    for i in infos:
        rows.append((i.name, i.distribution + (" (built-in)" if i.builtin else ""), i.version,
                     ", ".join(i.registers) or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    print(f"\n{len(infos)} plugins")
    return 0
