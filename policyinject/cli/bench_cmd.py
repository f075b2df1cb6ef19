"""``policyinject bench``: the decode benchmark (``benchmarks/decode.py``) from the command line.

Hugging Face eager, Hugging Face static cache + torch.compile and policyinject configs (kernels, kernels +
CUDA graphs, + int8, + int4) in one process on one GPU: ms/token at batch 1, tokens/s at larger batches,
prefill time, peak memory, the copy-bandwidth roofline and the fraction of it reached; a table, JSON and a
PNG plot. The options are the script's own (``policyinject bench --help``).

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser().add_subparsers()
    >>> p = add_parser(sub)
    >>> args = p.parse_args(["--preset", "llama-3.2-1b", "--batch", "1", "8"])
    >>> args.preset, args.batch, args.prompt, args.new
    (['llama-3.2-1b'], [1, 8], 128, 128)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from types import ModuleType

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "benchmarks", "decode.py")


def load_script(path: str = SCRIPT) -> ModuleType:
    """Import ``benchmarks/decode.py`` of this checkout as a module."""
    if not os.path.isfile(path):
        raise SystemExit(f"policyinject bench needs the repository's benchmarks/decode.py (looked at {path}); "
                         "install policyinject from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("policyinject_benchmark_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    script = load_script()
    parser = subparsers.add_parser(
        "bench", help="decode benchmark: HF eager / HF compiled / policyinject configs, roofline, table, JSON, plot",
        description=script.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    script.add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    load_script().run(args)
    return 0
