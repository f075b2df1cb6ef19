"""``policyinject inspect``: print the plan for a model without applying it.

The model is a preset name (``llama-3-8b``, ``tiny:gpt2``...), a local Hugging Face checkpoint folder, or
``module:callable`` (any importable function returning a model, e.g. a custom architecture);
it is built on the meta device, so inspecting an 8B model allocates nothing. Config options come from
``--config FILE`` and ``--set key=value`` (dotted keys, JSON values).

Example:
    >>> parse_assignments(["tensor_parallel.tp_size=2", "kernel_inject=true"])
    {'tensor_parallel': {'tp_size': 2}, 'kernel_inject': True}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import torch


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser("inspect", help="show the plan for a model without applying it")
    parser.add_argument("model", help="a preset (llama-3-8b, llama-3.2-1b, smollm2-135m, tiny:ARCH), "
                                      "a local Hugging Face checkpoint folder, or MODULE:CALLABLE returning a model")
    parser.add_argument("--config", help="a JSON/YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config option, dotted key, JSON value (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--max-rows", type=int, default=None, help="truncate the table")
    parser.set_defaults(func=run)
    return parser


def parse_assignments(items: Sequence[str]) -> dict:
    """Turn ``a.b=1`` strings into a nested dict (values parsed as JSON when they parse)."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, overrides: dict) -> dict:
    """Merge nested dicts, ``overrides`` winning.

    Example:
        >>> deep_merge({"tp": {"tp_size": 2, "x": 1}}, {"tp": {"tp_size": 4}})
        {'tp': {'tp_size': 4, 'x': 1}}
    """
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_model(spec: str) -> torch.nn.Module:
    """Build a model on the meta device from a preset name or a checkpoint folder."""
    from .._extras import require
    from ..testing import presets

    if spec.startswith("tiny:") or spec in presets.SHAPES:
        require("transformers", "hf")
    if spec.startswith("tiny:"):
        return presets.tiny_model(spec[5:], device="meta")
    if spec in presets.SHAPES:
        return presets.preset_model(spec, device="meta")
    if ":" in spec and not os.path.exists(spec):
        import importlib

        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"cannot load model factory {spec!r}: {exc}") from None
        with torch.device("meta"):
            return factory()
    if os.path.isdir(spec):
        transformers = require("transformers", "hf")

        config = transformers.AutoConfig.from_pretrained(spec)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    known = ", ".join(list(presets.SHAPES) + [f"tiny:{a}" for a in presets.TINY])
    raise SystemExit(f"unknown model {spec!r}: not a preset ({known}) and not a folder")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..errors import PlanError
    from ..pipeline import plan_inference

    try:
        overrides = parse_assignments(args.set)
        if args.config:
            base = load_config(args.config)
            config = load_config(deep_merge(base.to_dict(), overrides))
        else:
            config = load_config(overrides or None)
    except ConfigError as exc:
        print(f"policyinject inspect: invalid config:\n{exc}", file=sys.stderr)
        return 1
    model = build_model(args.model)
    try:
        plan = plan_inference(model, config)
    except PlanError as exc:
        print(f"policyinject inspect: planning failed:\n{exc}", file=sys.stderr)
        return 1
    if args.json:
        print(plan.dumps())
    else:
        print(f"model: {args.model} ({type(model).__name__})")
        print(plan.to_table(max_rows=args.max_rows))
    return 0
