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
from typing import Any, Optional, Sequence

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
    """Turn ``a.b=1`` strings into a nested dict (values parsed as JSON when they parse); a later assignment
    of the same key wins, and a key given both as a value and as a section is an error.

    Example:
        >>> parse_assignments(["tp=2", "tp.tp_size=2"])
        Traceback (most recent call last):
        ...
        SystemExit: --set 'tp.tp_size=2': `tp` is already set to a value by --set; give either tp=... or tp.KEY=...
    """
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
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                prefix = ".".join(parts[:i + 1])
                raise SystemExit(f"--set {item!r}: `{prefix}` is already set to a value by --set; give either "
                                 f"{prefix}=... or {prefix}.KEY=...")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise SystemExit(f"--set {item!r}: `{key}` is already a section set by --set {key}.KEY=...; give one")
        node[parts[-1]] = value
    return out


def load_inspect_config(config_file: Optional[str], assignments: Sequence[str]) -> Any:
    """The config ``inspect`` plans with: ``config_file`` (or none), then the ``--set`` assignments, each
    replacing the file's value of the same key in whatever spelling either uses (alias, deprecated key).
    Warnings are emitted; a bad config raises :class:`~policyinject.config.ConfigError`.

    Example:
        >>> load_inspect_config(None, ["tp.tp_size=2"]).tensor_parallel.tp_size
        2
    """
    import warnings

    from ..config import load_config
    from ..config.loader import parse_config_overriding

    overrides = parse_assignments(assignments)
    if not config_file:
        return load_config(overrides or None)
    result = parse_config_overriding(config_file, overrides)
    for w in result.warnings:
        warnings.warn(w.message, w.category, stacklevel=2)
    return result.config


def build_model(spec: str) -> torch.nn.Module:
    """Build a model on the meta device from a preset name or a checkpoint folder."""
    from .._extras import require
    from ..testing import presets

    if spec.startswith("tiny:") or spec in presets.SHAPES:
        require("transformers", "hf")
    if spec.startswith("tiny:"):
        if spec[5:] not in presets.TINY:
            raise SystemExit(f"unknown tiny architecture {spec[5:]!r}; known: {', '.join(presets.TINY)}")
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
        try:
            with torch.device("meta"):
                model = factory()
        except Exception as exc:  # the user's factory failed: say which, without a traceback of ours
            raise SystemExit(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if os.path.isdir(spec):
        transformers = require("transformers", "hf")

        try:
            config = transformers.AutoConfig.from_pretrained(spec)
            with torch.device("meta"):
                return transformers.AutoModelForCausalLM.from_config(config)
        except (OSError, ValueError, KeyError) as exc:  # no config.json, an unknown model_type, ...
            raise SystemExit(f"cannot build a model from the folder {spec!r}: {type(exc).__name__}: {exc}") from None
    known = ", ".join(list(presets.SHAPES) + [f"tiny:{a}" for a in presets.TINY])
    raise SystemExit(f"unknown model {spec!r}: not a preset ({known}) and not a folder")


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..errors import PolicyInjectError
    from ..pipeline import plan_inference

    try:
        config = load_inspect_config(args.config, args.set)
    except ConfigError as exc:
        print(f"policyinject inspect: invalid config:\n{exc}", file=sys.stderr)
        return 1
    model = build_model(args.model)
    try:
        plan = plan_inference(model, config)
    except PolicyInjectError as exc:  # PlanError, PolicyError, PluginError, UnsupportedError, ConfigError
        print(f"policyinject inspect: planning failed ({type(exc).__name__}):\n{exc}", file=sys.stderr)
        return 1
    if args.json:
        print(plan.dumps())
    else:
        print(f"model: {args.model} ({type(model).__name__})")
        print(plan.to_table(max_rows=args.max_rows))
    return 0
