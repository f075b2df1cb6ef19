"""Save and load quantized weights: one safetensors file with a small metadata header.

:func:`save_quantized` writes every :class:`~policyinject.modules.quant_linear.QuantLinear` of a quantized
model (``<path>.qweight``, ``<path>.scales``, ``<path>.zeros`` when asymmetric) plus the float parameters that
AWQ's scale folding changed (``float.<name>``: norm weights), with this header (safetensors metadata, all
strings):

* ``policyinject.format``: :data:`FORMAT_VERSION`;
* ``policyinject.model_class``: the model's class name;
* ``policyinject.fingerprint``: JSON of the quantization settings (:func:`fingerprint`: bits, q_type, grouping,
  method, qkv/lm_head, and for calibrated methods the calibration input, rows, length, seed, act-order);
* ``policyinject.layout``: JSON of each linear's ``[out, in]``, bits, group size and symmetry.

Loading (``quant.checkpoint: <file>`` in the config; the quantize pass calls :func:`load_quantized`) checks the
format, the model class, that the fingerprint equals the current config's (a difference is a ``PlanError``
naming every differing key with both values), and that the planned linears and their layout equal the file's.
Then no calibration runs: the stored integers are used as they are.

Example:
    >>> import torch, tempfile, os
    >>> from policyinject.modules.quant_linear import QuantLinear
    >>> model = torch.nn.Sequential(QuantLinear.from_linear(torch.nn.Linear(64, 8), 4, 32, False, "torch"))
    >>> path = os.path.join(tempfile.mkdtemp(), "q.safetensors")
    >>> save_quantized(model, path, {"quant.weight.num_bits": 4})
    >>> ckpt = read_checkpoint(path)
    >>> ckpt.fingerprint, sorted(ckpt.weights), ckpt.layout["0"]["group_size"]
    ({'quant.weight.num_bits': 4}, ['0'], 32)
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional

import attrs
import torch
from torch import nn

from ..errors import PlanError
from ..kernels.quantize import QuantizedWeight

__all__ = ["FORMAT_VERSION", "QuantRecord", "Checkpoint", "fingerprint", "save_quantized", "read_checkpoint",
           "check_fingerprint", "RECORD_ATTR"]

#: Version of the file layout; a file of another version is refused.
FORMAT_VERSION = "1"

#: Attribute of a quantized model holding its :class:`QuantRecord` (set by the quantize pass).
RECORD_ATTR = "_policyinject_quant_record"


@attrs.frozen
class QuantRecord:
    """What a model's quantization was: the config fingerprint and the float parameters scale folding changed."""

    fingerprint: Mapping[str, Any]
    folded: tuple = ()


@attrs.frozen
class Checkpoint:
    """A read quantized checkpoint."""

    model_class: str
    fingerprint: Dict[str, Any]
    layout: Dict[str, Dict[str, Any]]
    weights: Dict[str, QuantizedWeight]
    floats: Dict[str, torch.Tensor]


def fingerprint(config: Any, method: str) -> Dict[str, Any]:
    """The quantization settings that decide the stored weights, by config key (``method`` resolved).

    Example:
        >>> from policyinject.config import load_config
        >>> fp = fingerprint(load_config(quant={"enabled": True, "weight": {"num_bits": 4}}), "hqq")
        >>> fp["quant.weight.method"], fp["quant.weight.q_type"], "quant.calibration.seed" in fp
        ('hqq', 'asymmetric', False)
    """
    from ..config.model import resolve_q_type
    from .data_source import calibration_spec_from_config, describe_data

    quant = getattr(config, "quant", None)
    w = getattr(quant, "weight", None)
    bits = int(getattr(w, "num_bits", 8))
    fp: Dict[str, Any] = {
        "quant.weight.num_bits": bits,
        "quant.weight.q_type": resolve_q_type(str(getattr(w, "q_type", "auto")), bits),
        "quant.weight.group_size": getattr(w, "group_size", None),
        "quant.weight.q_groups": getattr(w, "q_groups", 1),
        "quant.weight.method": method,
        "quant.qkv.enabled": bool(getattr(getattr(quant, "qkv", None), "enabled", True)),
        "quant.lm_head.enabled": bool(getattr(getattr(quant, "lm_head", None), "enabled", False)),
    }
    if method in ("gptq", "awq"):
        spec = calibration_spec_from_config(config)
        fp.update({"quant.calibration.data": describe_data(spec.data),
                   "quant.calibration.num_samples": spec.num_samples, "quant.calibration.seq_len": spec.seq_len,
                   "quant.calibration.seed": spec.seed})
        if method == "gptq":
            fp["quant.calibration.act_order"] = spec.act_order
            fp["quant.calibration.gptq_grid"] = spec.gptq_grid
            fp["quant.calibration.damp"] = spec.damp
    return fp


def _unwrap(model: Any) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) and not isinstance(model, nn.Sequential) else model


def save_quantized(model: Any, path: "str | os.PathLike", fp: Optional[Mapping[str, Any]] = None) -> None:
    """Write the quantized weights of ``model`` (an ``nn.Module`` or an ``InferenceEngine``) to ``path``.

    ``fp``: the fingerprint to store; by default the one the quantize pass recorded on the model. A model
    without quantized linears is an error. Fused linears (kernel injection) are saved under their fused
    names: save before injecting, or load with the same config.

    Example:
        >>> save_quantized(torch.nn.Linear(2, 2), "/tmp/never.safetensors")
        Traceback (most recent call last):
        ...
        policyinject.errors.PlanError: save_quantized: Linear carries no quantization record; pass the fingerprint, or quantize it with init_inference
    """
    from safetensors.torch import save_file

    from ..modules.quant_linear import QuantLinear

    module = _unwrap(model)
    record = getattr(module, RECORD_ATTR, None)
    if fp is None:
        if record is None:
            raise PlanError(f"save_quantized: {type(module).__name__} carries no quantization record; pass the "
                            "fingerprint, or quantize it with init_inference")
        fp = dict(record.fingerprint)
    tensors: Dict[str, torch.Tensor] = {}
    layout: Dict[str, Dict[str, Any]] = {}
    for name, mod in module.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        tensors[f"{name}.qweight"] = mod.qweight.detach().contiguous().cpu()
        tensors[f"{name}.scales"] = mod.scales.detach().contiguous().cpu()
        if mod.zeros is not None:
            tensors[f"{name}.zeros"] = mod.zeros.detach().contiguous().cpu()
        layout[name] = {"shape": [mod.out_features, mod.in_features], "num_bits": mod.num_bits,
                        "group_size": mod.group_size, "symmetric": mod.zeros is None}
    if not layout:
        raise PlanError(f"save_quantized: {type(module).__name__} has no quantized linears (QuantLinear); "
                        "quantize it first (quant.enabled)")
    params = dict(module.named_parameters(remove_duplicate=False))
    for name in (record.folded if record is not None else ()):
        if name in params:
            tensors[f"float.{name}"] = params[name].detach().contiguous().cpu()
    meta = {"policyinject.format": FORMAT_VERSION, "policyinject.model_class": type(module).__name__,
            "policyinject.fingerprint": json.dumps(dict(fp), sort_keys=True),
            "policyinject.layout": json.dumps(layout, sort_keys=True)}
    save_file(tensors, os.fspath(path), metadata=meta)


def read_checkpoint(path: "str | os.PathLike") -> Checkpoint:
    """Read a file written by :func:`save_quantized` (``PlanError`` for a missing file or another format)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PlanError(f"quant.checkpoint: {path!r} does not exist; quantize once without quant.checkpoint and "
                        "write it with save_quantized(engine, path)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        version = meta.get("policyinject.format")
        if version != FORMAT_VERSION:
            raise PlanError(f"quant.checkpoint: {path!r} is not a policyinject quantized checkpoint of format "
                            f"{FORMAT_VERSION} (its format: {version!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layout = json.loads(meta["policyinject.layout"])
    weights = {}
    for name, lay in layout.items():
        out_f, in_f = lay["shape"]
        weights[name] = QuantizedWeight(tensors[f"{name}.qweight"], tensors[f"{name}.scales"],
                                        tensors.get(f"{name}.zeros"), int(lay["num_bits"]), int(lay["group_size"]),
                                        int(in_f), int(out_f))
    floats = {k[len("float."):]: t for k, t in tensors.items() if k.startswith("float.")}
    return Checkpoint(meta["policyinject.model_class"], json.loads(meta["policyinject.fingerprint"]), layout,
                      weights, floats)


def check_fingerprint(stored: Mapping[str, Any], current: Mapping[str, Any], path: str = "") -> None:
    """Raise a ``PlanError`` naming every key whose value differs between a checkpoint and the config.

    Example:
        >>> check_fingerprint({"quant.weight.num_bits": 4}, {"quant.weight.num_bits": 8}, "q.safetensors")
        Traceback (most recent call last):
        ...
        policyinject.errors.PlanError: quant.checkpoint 'q.safetensors' was made with other quantization settings: quant.weight.num_bits: file 4, config 8
    """
    diffs = [f"{k}: file {stored.get(k, '<absent>')!r}, config {current.get(k, '<absent>')!r}"
             for k in sorted(set(stored) | set(current)) if stored.get(k, "<absent>") != current.get(k, "<absent>")]
    if diffs:
        raise PlanError(f"quant.checkpoint {path!r} was made with other quantization settings: " + "; ".join(diffs))
