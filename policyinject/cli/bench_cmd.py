"""``policyinject bench``: the decode benchmark (:mod:`policyinject.bench.decode`) from the command line.

Hugging Face eager, Hugging Face static cache + torch.compile and policyinject configs (kernels, kernels +
CUDA graphs, + int8, + int4) in one process on one GPU: ms/token at batch 1, tokens/s at larger batches,
prefill time, peak memory, the copy-bandwidth roofline and the fraction of it reached; a table, JSON and a
PNG plot. Needs the ``bench`` extra to run (``--help`` works without it).

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


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``bench`` with the benchmark's own options."""
    from ..bench import decode

    parser = subparsers.add_parser(
        "bench", help="decode benchmark: HF eager / HF compiled / policyinject configs, roofline, table, JSON, plot",
        description=decode.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decode.add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the decode benchmark with the parsed options."""
    from ..bench import decode

    decode.run(args)
    return 0
