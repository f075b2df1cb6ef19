"""Run by scripts/wheel_check.sh inside a fresh venv holding only the built wheel: the installed package is
whole. Every CLI sub-command's --help (found by walking the parser), ``config schema``, ``plugins --json``,
``inspect`` on presets, and the public API, all without the checkout on ``sys.path``.

Usage: python wheel_smoke.py PATH/TO/bin/policyinject   (the environment variable CHECKOUT names the checkout)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run(cli: str, *args: str) -> str:
    proc = subprocess.run([cli, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"wheel-smoke: `policyinject {' '.join(args)}` exited {proc.returncode}:\n"
                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"wheel-smoke: ok  policyinject {' '.join(args)}")
    return proc.stdout


def subcommands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list:
    """Every sub-command path of the parser, depth first: [(), ("config",), ("config", "check"), ...]."""
    out = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(subcommands(sub, prefix + (name,)))
    return out


def main() -> None:
    cli = sys.argv[1]
    checkout = os.path.realpath(os.environ["CHECKOUT"])
    for entry in sys.path:
        if entry and os.path.realpath(entry).startswith(checkout):
            sys.exit(f"wheel-smoke: the checkout is on sys.path ({entry})")
    import policyinject
    from policyinject.cli import build_parser

    if os.path.realpath(policyinject.__file__).startswith(checkout):
        sys.exit(f"wheel-smoke: policyinject imported from the checkout ({policyinject.__file__})")
    for names in subcommands(build_parser()):
        run(cli, *names, "--help")
    schema = json.loads(run(cli, "config", "schema"))
    assert schema["type"] == "object" and "properties" in schema, schema.keys()
    plugins = json.loads(run(cli, "plugins", "--json"))
    builtins = [p for p in plugins if p["builtin"]]
    assert len(builtins) >= 13 and all(p["registers"] for p in builtins), plugins
    assert "layers matched: 32" in run(cli, "inspect", "llama-3-8b", "--max-rows", "3")
    plan = json.loads(run(cli, "inspect", "tiny:gpt2", "--json", "--set", "replace_with_kernel_inject=true"))
    assert plan["actions"], plan
    import torch

    engine = policyinject.init_inference(torch.nn.Sequential(torch.nn.Linear(4, 4)), dtype="fp32")
    assert engine(torch.ones(1, 4)).shape == (1, 4)
    missing = [name for name in policyinject.__all__ if not hasattr(policyinject, name)]
    assert not missing, missing
    print(f"wheel-smoke: passed ({len(plugins)} plugins, policyinject {policyinject.__version__} "
          f"from {os.path.dirname(policyinject.__file__)})")


if __name__ == "__main__":
    main()
