"""Layer-by-layer calibration for the calibrated quantization methods (``gptq``, ``awq``).

:func:`calibrate` runs the model on the calibration rows (:mod:`.data_source`) only up to the first matched
layer, keeps those hidden states (and the keyword arguments the layer received: rotary embeddings, masks),
then walks the layers in order. For each layer it:

1. runs the layer on the kept hidden states with hooks on the linears to quantize, collecting their inputs
   (GPTQ: the Hessian ``sum x x^T`` of each linear; AWQ: a strided sample of the input rows);
2. quantizes those linears (:func:`~policyinject.kernels.quant_search.gptq_quantize_weight` with act-order and
   static contiguous groups; or :mod:`.awq`'s scale search, fold and clip search, then round to nearest);
3. writes the dequantized weights into the float linears and runs the layer again: its outputs, computed with
   the quantized weights, are the next layer's inputs (so each layer is calibrated on what it will really see).

Peak memory is the model plus one layer's activations for all rows (``num_samples x seq_len x hidden``) and
the collected statistics of one layer. Each layer logs a progress line on the ``policyinject.quant`` logger.
Everything is deterministic for a given seed (the rows are; the arithmetic is sequential float32).

The result maps each linear's path to a :class:`~policyinject.kernels.quantize.QuantizedWeight` (the stored
format of every int4/int8 kernel) and lists the float parameters AWQ changed (norm weights), so a checkpoint
(:mod:`.checkpoint`) can restore both.

Example (a tiny random Llama; real models work the same way):
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> from policyinject.quant.data_source import CalibrationSpec
    >>> spec = CalibrationSpec(data=[torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))])
    >>> layers = [(f"model.layers.{i}", l) for i, l in enumerate(model.model.layers)]
    >>> targets = {f"{p}.mlp.down_proj": Target(4, 32, False) for p, _ in layers}
    >>> res = calibrate(model, layers, targets, "gptq", spec)
    >>> sorted(res.weights)[0], res.weights["model.layers.0.mlp.down_proj"].scales.shape
    ('model.layers.0.mlp.down_proj', torch.Size([64, 4]))
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn

from ..errors import PlanError
from ..kernels.quant_search import HessianAccumulator, gptq_quantize_weight
from ..kernels.quantize import QuantizedWeight, dequantize_weight
from . import awq as awq_mod
from .data_source import CalibrationSpec, calibration_rows

__all__ = ["Target", "CalibrationResult", "calibrate", "CALIBRATED_METHODS"]

log = logging.getLogger("policyinject.quant")

#: Methods that need calibration data.
CALIBRATED_METHODS = ("gptq", "awq")

#: Input rows per linear kept for AWQ's searches (strided over all calibration tokens).
AWQ_ROWS = 1024


@attrs.frozen
class Target:
    """How one linear is quantized: bits, group size (its whole input width for per-channel), symmetry;
    ``transposed``: a GPT-2 ``Conv1D`` (weight stored ``[in, out]``)."""

    num_bits: int
    group_size: int
    symmetric: bool
    transposed: bool = False


@attrs.define
class CalibrationResult:
    """What :func:`calibrate` produced: quantized weights by linear path, float parameters changed by scale
    folding (full parameter name -> tensor), one line per linear on what was done, and the seconds taken."""

    weights: Dict[str, QuantizedWeight] = attrs.field(factory=dict)
    folded: Dict[str, torch.Tensor] = attrs.field(factory=dict)
    notes: Dict[str, str] = attrs.field(factory=dict)
    seconds: float = 0.0


class _Stop(Exception):
    pass


def _weight(mod: nn.Module, transposed: bool) -> torch.Tensor:
    """The ``[out, in]`` float32 weight of a linear-like module."""
    w = mod.weight.detach()
    return (w.t() if transposed else w).to(torch.float32)


def _set_weight(mod: nn.Module, w: torch.Tensor, transposed: bool) -> None:
    with torch.no_grad():
        mod.weight.copy_((w.t() if transposed else w).to(mod.weight.dtype))


def _capture_first_layer_inputs(model: nn.Module, first: nn.Module, rows: Sequence[torch.Tensor],
                                device: torch.device) -> List[Tuple[torch.Tensor, tuple, dict]]:
    captured: List[Tuple[torch.Tensor, tuple, dict]] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        for cache_key in ("past_key_values", "past_key_value", "layer_past"):
            if cache_key in kwargs:
                kwargs[cache_key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((hidden.detach(), rest, kwargs))
        raise _Stop

    takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for row in rows:
                try:
                    if takes_use_cache:
                        model(row.to(device), use_cache=False)
                    else:
                        model(row.to(device))
                except _Stop:
                    continue
                raise PlanError(f"calibration: the model's forward never reached its first matched layer "
                                f"({type(first).__name__}); cannot calibrate")
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, states: List[Tuple[torch.Tensor, tuple, dict]]) -> List[torch.Tensor]:
    outs = []
    with torch.inference_mode():
        for hidden, rest, kwargs in states:
            out = layer(hidden, *rest, **kwargs)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


class _Collector:
    """Forward hooks gathering each target linear's inputs: a Hessian (GPTQ) or a row sample (AWQ)."""

    def __init__(self, modules: Dict[str, nn.Module], method: str, stride: int) -> None:
        self.method, self.stride = method, stride
        self.hessians: Dict[str, HessianAccumulator] = {}
        self.samples: Dict[str, List[torch.Tensor]] = {p: [] for p in modules}
        self.handles = [m.register_forward_hook(self._hook(p)) for p, m in modules.items()]

    def _hook(self, path: str):
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if self.method == "gptq":
                acc = self.hessians.get(path)
                if acc is None:
                    acc = self.hessians[path] = HessianAccumulator(x.shape[-1], device=x.device)
                acc.add(x)
            else:
                self.samples[path].append(x[:: self.stride].to(torch.float32).clone())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def calibrate(
    model: nn.Module,
    layers: Sequence[Tuple[str, nn.Module]],
    targets: Dict[str, Target],
    method: str,
    spec: CalibrationSpec,
    *,
    policies: Optional[Sequence[Any]] = None,
    device: Optional[torch.device] = None,
) -> CalibrationResult:
    """Quantize the linears ``targets`` (full module paths) of ``model`` layer by layer (module docstring).

    ``layers``: ``(path, module)`` of the matched layers in model order; ``policies``: their policies (AWQ
    reads what precedes each linear from them; without them, AWQ searches no scales, only clipping).
    The float linears are left holding their dequantized weights (and AWQ's folds), i.e. the model computes
    what the quantized model will.
    """
    if method not in CALIBRATED_METHODS:
        raise PlanError(f"calibrate: method must be one of {', '.join(CALIBRATED_METHODS)}, got {method!r}")
    t_start = time.perf_counter()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = calibration_rows(spec)
    tokens = sum(int(r.numel()) for r in rows)
    stride = max(1, tokens // AWQ_ROWS)
    by_layer: List[Tuple[str, nn.Module, Dict[str, nn.Module], Any]] = []
    for i, (lpath, layer) in enumerate(layers):
        prefix = f"{lpath}." if lpath else ""
        mods = {p: model.get_submodule(p) for p in targets if p.startswith(prefix)}
        by_layer.append((lpath, layer, mods, None if policies is None else policies[i]))
    missing = set(targets) - {p for _, _, mods, _ in by_layer for p in mods}
    if missing:
        raise PlanError(f"calibration: {sorted(missing)[0]} is not inside a matched layer; calibrated methods "
                        "quantize layer linears only (quant.lm_head.enabled needs method rtn or hqq)")
    log.info("calibrate %s: %d rows x %d tokens (seed %d), %d layers, %d linears", method, len(rows),
             int(rows[0].shape[-1]), spec.seed, len(layers), len(targets))
    states = _capture_first_layer_inputs(model, layers[0][1], rows, device)
    result = CalibrationResult()
    for i, (lpath, layer, mods, policy) in enumerate(by_layer):
        t0 = time.perf_counter()
        if mods:
            collector = _Collector(mods, method, stride)
            try:
                _run_layer(layer, states)
            finally:
                collector.remove()
            if method == "gptq":
                _gptq_layer(mods, targets, collector, spec, result)
            else:
                from .awq_fold import awq_layer

                awq_layer(model, lpath, layer, policy, mods, targets, collector.samples, result)
        outs = _run_layer(layer, states)
        states = [(o, rest, kwargs) for o, (_, rest, kwargs) in zip(outs, states)]
        log.info("calibrate %s: layer %d/%d (%s): %d linears, %.1f s", method, i + 1, len(by_layer), lpath,
                 len(mods), time.perf_counter() - t0)
    result.seconds = time.perf_counter() - t_start
    log.info("calibrate %s: done in %.1f s", method, result.seconds)
    return result


def _gptq_layer(mods: Dict[str, nn.Module], targets: Dict[str, Target], collector: _Collector,
                spec: CalibrationSpec, result: CalibrationResult) -> None:
    for path, mod in mods.items():
        t = targets[path]
        acc = collector.hessians.get(path)
        if acc is None:
            raise PlanError(f"calibration: {path} was never called while its layer ran; cannot calibrate it")
        qw = gptq_quantize_weight(_weight(mod, t.transposed), acc.hessian, t.num_bits, t.group_size, t.symmetric,
                                  act_order=spec.act_order, static_grid=spec.gptq_grid, damp=spec.damp)
        _set_weight(mod, dequantize_weight(qw), t.transposed)
        result.weights[path] = qw
        result.notes[path] = (f"gptq (act_order={spec.act_order}, grid {spec.gptq_grid}, damp {spec.damp}, "
                              f"{acc.count} calibration tokens)")
