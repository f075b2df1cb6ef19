"""``policyinject config``: ``check FILE`` validates a config file, ``schema`` prints its JSON Schema,
``table`` prints the key table of docs/config.md.

``check`` prints the normalized config as JSON on stdout and every warning on stderr (exit 0); on bad input
it prints every problem on stderr and exits 1.

Example:
    >>> from policyinject.cli import main
    >>> main(["config", "schema"]) == 0  # doctest: +ELLIPSIS
    {
      "$schema": "https://json-schema.org/draft/2020-12/schema",
    ...
    True
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config.doc_table import render_key_table
from ..config.errors import ConfigError
from ..config.loader import parse_config
from ..config.schema import json_schema


def _warning_line(w: Any) -> str:
    return f"warning: {w.category.__name__}: {w.message}"


def run_check(args: argparse.Namespace) -> int:
    """Validate ``args.file``; print the normalized config (stdout) and warnings / problems (stderr)."""
    try:
        result = parse_config(args.file)
    except ConfigError as e:
        for w in e.warnings:
            print(_warning_line(w), file=sys.stderr)
        print(f"error: {args.file}: invalid config ({len(e.problems)} problem"
              f"{'s' if len(e.problems) != 1 else ''}):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(_warning_line(w), file=sys.stderr)
    print(json.dumps(result.config.to_dict(), indent=2))
    return 0


def run_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema (draft 2020-12) of the configuration."""
    print(json.dumps(json_schema(), indent=2))
    return 0


def run_table(args: argparse.Namespace) -> int:
    """Print the Markdown key table (the generated part of docs/config.md)."""
    print(render_key_table())
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``config`` with its ``check``, ``schema`` and ``table`` sub-commands."""
    parser = subparsers.add_parser(
        "config", help="validate a config file, print the config's JSON Schema or key table",
        description="Inference configuration tools (DeepSpeed-Inference compatible keys; see docs/config.md).",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="validate a .json/.yaml config; print it normalized, with every warning")
    check.add_argument("file", help="path to a .json, .yaml or .yml config file")
    check.set_defaults(func=run_check)
    schema = sub.add_parser("schema", help="print the JSON Schema (draft 2020-12) of the configuration")
    schema.set_defaults(func=run_schema)
    table = sub.add_parser("table", help="print the Markdown table of every key (docs/config.md)")
    table.set_defaults(func=run_table)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    return parser
