"""The quantize pass's entry into this package: calibrated methods and stored checkpoints.

:func:`prepare_quantized` runs at the start of the quantize pass's apply, on the planned actions. It returns the
:class:`~policyinject.kernels.quantize.QuantizedWeight` of each linear it prepared (the pass wraps them in
``QuantLinear``; linears it did not prepare are quantized by the pass's own rtn/hqq path):

* ``quant.checkpoint`` set: the weights read from the file (:mod:`.checkpoint`), after checking that the file
  was made with this config and this model; AWQ's folded norm weights are restored into the model;
* ``quant.weight.method`` ``gptq`` or ``awq``: the weights from :func:`~.calibrate.calibrate`;
* otherwise nothing.

In every case it records the config fingerprint on the model, so :func:`~.checkpoint.save_quantized` can
write the result.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch

from ..errors import PlanError
from ..kernels.quantize import QuantizedWeight
from .calibrate import CALIBRATED_METHODS, Target, calibrate
from .checkpoint import RECORD_ATTR, QuantRecord, check_fingerprint, fingerprint, read_checkpoint
from .data_source import calibration_spec_from_config

__all__ = ["prepare_quantized"]

log = logging.getLogger("policyinject.quant")


def _method(config: Any) -> str:
    from ..passes.quantize import quant_spec_from_config, resolve_method

    spec = quant_spec_from_config(config)
    return resolve_method(spec.method, spec.num_bits, spec.symmetric)


def _in_features(mod: torch.nn.Module, transposed: bool) -> int:
    w = getattr(mod, "local", mod).weight
    return int(w.shape[0] if (transposed or type(mod).__name__ == "Conv1D") else w.shape[1])


def prepare_quantized(ctx: Any, actions: List[Any]) -> Dict[str, QuantizedWeight]:
    """Quantized weights by linear path for the pass's ``quantize`` actions (module docstring)."""
    planned = [a for a in actions if a.action == "quantize"]
    method = _method(ctx.config)
    fp = fingerprint(ctx.config, method)
    ckpt_path = getattr(getattr(ctx.config, "quant", None), "checkpoint", None)
    if ckpt_path:
        weights, folded = _load(ctx, planned, str(ckpt_path), fp)
    elif method in CALIBRATED_METHODS and planned:
        weights, folded = _calibrate(ctx, planned, method)
    else:
        weights, folded = {}, ()
    setattr(ctx.model, RECORD_ATTR, QuantRecord(fp, tuple(folded)))
    return weights


def _calibrate(ctx: Any, planned: List[Any], method: str) -> tuple:
    tp = int(getattr(getattr(ctx.config, "tensor_parallel", None), "tp_size", 1) or 1)
    if tp > 1:
        raise PlanError(f"quant.weight.method {method!r} calibrates the whole model and does not run under "
                        f"tensor_parallel.tp_size={tp}: quantize once with tp_size 1, save_quantized(), then load "
                        "with quant.checkpoint")
    targets: Dict[str, Target] = {}
    for a in planned:
        p = a.payload
        mod = ctx.module(a.path)
        if isinstance(getattr(mod, "local", None), torch.nn.Module) or callable(getattr(mod, "policyinject_quantize", None)):
            raise PlanError(f"{a.path}: quant.weight.method {method!r} takes plain linears, not "
                            f"{type(mod).__name__}")
        in_f = _in_features(mod, p.transposed)
        targets[a.path] = Target(p.num_bits, in_f if p.per_channel else p.group_size, p.symmetric,
                                 p.transposed)
    layers = [(layer.path, layer.module) for layer in ctx.layers]
    if not layers:
        raise PlanError(f"quant.weight.method {method!r}: no layer of the model matched a policy; calibration runs "
                        "layer by layer")
    result = calibrate(ctx.model, layers, targets, method, calibration_spec_from_config(ctx.config),
                       policies=[layer.policy for layer in ctx.layers], device=ctx.device)
    quantized = set(result.weights)
    folded = [n for n in result.folded if n.rsplit(".", 1)[0] not in quantized]
    return result.weights, folded


def _load(ctx: Any, planned: List[Any], path: str, fp: Dict[str, Any]) -> tuple:
    ckpt = read_checkpoint(path)
    model_class = type(ctx.model).__name__
    if ckpt.model_class != model_class:
        raise PlanError(f"quant.checkpoint {path!r} holds a {ckpt.model_class}, not a {model_class}")
    check_fingerprint(ckpt.fingerprint, fp, path)
    want = {a.path for a in planned}
    have = set(ckpt.weights)
    if want != have:
        extra, missing = sorted(have - want), sorted(want - have)
        raise PlanError(f"quant.checkpoint {path!r} does not hold the linears this config quantizes: "
                        + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "")
                        + ("; " if missing and extra else "")
                        + (f"not planned {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else ""))
    out: Dict[str, QuantizedWeight] = {}
    for a in planned:
        mod = ctx.module(a.path)
        qw = ckpt.weights[a.path]
        w = getattr(mod, "local", mod).weight
        shape = tuple(w.shape[::-1]) if (a.payload.transposed or type(mod).__name__ == "Conv1D") else tuple(w.shape)
        group = shape[1] if a.payload.per_channel else a.payload.group_size
        if (qw.out_features, qw.in_features) != shape or qw.group_size != group or qw.num_bits != a.payload.num_bits:
            raise PlanError(f"quant.checkpoint {path!r}: {a.path} is stored as [{qw.out_features}, {qw.in_features}] "
                            f"{qw.num_bits}-bit group {qw.group_size}; the model and config give {list(shape)} "
                            f"{a.payload.num_bits}-bit group {group}")
        out[a.path] = qw.to(w.device)
    params = dict(ctx.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in ckpt.floats.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != tuple(t.shape):
                raise PlanError(f"quant.checkpoint {path!r}: the stored float parameter {name} "
                                f"{list(t.shape)} has no match in {model_class}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    log.info("quant.checkpoint: loaded %d quantized linears and %d float parameters from %s", len(out),
             len(ckpt.floats), path)
    return out, list(ckpt.floats)
