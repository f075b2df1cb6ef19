"""The ``policyinject`` command line: ``demo``, ``inspect``, ``config``, ``plugins``, ``bench``.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``; the parser it adds sets
``func(args) -> int``.

Example:
    >>> from policyinject.cli import build_parser
    >>> "config" in build_parser().format_help()
    True
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = ("demo_cmd", "inspect_cmd", "bench_cmd", "config_cmd", "plugins_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyinject",
        description="Make PyTorch models fast for inference from a declarative description of their architecture.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``policyinject`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
