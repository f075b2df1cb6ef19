"""Where AWQ's input scales go: what precedes each group of linears in a layer, read from its policy.

:func:`awq_groups` lists, for one layer, the groups of linears that share an input and the module that
produces it and can absorb the scales exactly:

* q/k/v (or a fused qkv) after the policy's ``input_norm`` and gate/up (or plain fc1) after
  ``post_attention_norm``, in ``pre_norm`` blocks whose norm has a plain weight (no ``weight_offset``): the norm's
  weight (and bias) is divided by the scales;
* a gated MLP's ``down`` after its separate ``up``: ``up``'s rows are divided by the scales (the gate's
  activation multiplies ``up``'s output elementwise, so the scale passes through);
* attention's ``o`` after a separate ``v`` of the same width (no grouped-query sharing): ``v``'s rows.

Any other linear (``o`` under grouped-query attention, a plain MLP's fc2 behind its nonlinearity, a fused
gate_up's down, a parallel or post-norm block) has nothing that can absorb scales: it gets no scales, only
AWQ's clip search, and its note says why -- scales are never searched and then dropped.

Example:
    >>> from policyinject.policy import Policy, AttentionSpec, MLPSpec
    >>> import torch
    >>> class L(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.ln = torch.nn.LayerNorm(8); self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))
    >>> pol = Policy(L, attention=AttentionSpec(q="q", k="k", v="v", o="o"), block="pre_norm", input_norm="ln")
    >>> [(g.linears, g.absorber) for g in awq_groups(pol, L())]
    [(('q', 'k', 'v'), 'ln'), (('o',), 'v')]
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import attrs
import torch
from torch import nn

from ..kernels.quantize import dequantize_weight
from . import awq as awq_mod

__all__ = ["AWQGroup", "awq_groups", "awq_layer"]

log = logging.getLogger("policyinject.quant")


@attrs.frozen
class AWQGroup:
    """Linears (paths relative to the layer) sharing one input, and what absorbs their scales (None: nothing;
    ``reason`` says why)."""

    linears: Tuple[str, ...]
    absorber: Optional[str] = None
    kind: str = "none"  # "norm", "linear_rows" or "none"
    reason: str = ""


def _norm_ok(policy: Any, layer: nn.Module, path: Optional[str]) -> str:
    """'' when the norm at ``path`` can absorb scales, else the reason it cannot."""
    if not path:
        return "the policy names no norm before it"
    if getattr(getattr(policy, "block", None), "value", getattr(policy, "block", None)) != "pre_norm":
        return f"the policy's block is {getattr(policy.block, 'value', policy.block)!r}, not 'pre_norm'"
    for spec in getattr(policy, "norms", ()) or ():
        if getattr(spec, "path", None) == path and getattr(spec, "weight_offset", 0.0):
            return f"the norm {path} uses a weight offset"
    try:
        norm = layer.get_submodule(path)
    except AttributeError:
        return f"the policy's norm {path!r} is not a submodule"
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return f"the norm {path} has no 1-D weight"
    return ""


def awq_groups(policy: Any, layer: nn.Module) -> List[AWQGroup]:
    """The input-sharing groups of ``layer``'s linears and their absorbers (module docstring)."""
    groups: List[AWQGroup] = []
    a = getattr(policy, "attention", None)
    m = getattr(policy, "mlp", None)
    if a is not None:
        qkv = tuple(a.path(n) for n in ((a.qkv,) if a.qkv else (a.q, a.k, a.v)) if n)
        if qkv:
            why = _norm_ok(policy, layer, policy.input_norm)
            groups.append(AWQGroup(qkv, None if why else policy.input_norm, "none" if why else "norm", why))
        if a.o:
            o, v = a.path(a.o), a.path(a.v) if a.v else None
            why = "attention has a fused qkv" if v is None else ""
            if not why:
                ow, vw = layer.get_submodule(o).weight, layer.get_submodule(v).weight
                if type(layer.get_submodule(v)) is not nn.Linear or type(layer.get_submodule(o)) is not nn.Linear:
                    why = "v or o is not a plain nn.Linear"
                elif vw.shape[0] != ow.shape[1]:
                    why = "grouped-query attention: v is narrower than o's input"
            groups.append(AWQGroup((o,), None if why else v, "none" if why else "linear_rows", why))
    if m is not None:
        first = tuple(m.path(n) for n in ((m.gate_up,) if m.gate_up else (m.gate, m.up) if m.gated else (m.fc1,)) if n)
        if first:
            norm = policy.post_attention_norm
            why = _norm_ok(policy, layer, norm)
            groups.append(AWQGroup(first, None if why else norm, "none" if why else "norm", why))
        down = m.path(m.down if m.gated else m.fc2)
        if down:
            up = m.path(m.up) if (m.gated and m.up) else None
            why = ("the MLP is not gated (a nonlinearity precedes it)" if not m.gated
                   else "the MLP has a fused gate_up" if up is None
                   else "" if type(layer.get_submodule(up)) is nn.Linear else "up is not a plain nn.Linear")
            groups.append(AWQGroup((down,), None if why else up, "none" if why else "linear_rows", why))
    return groups


def awq_layer(model: nn.Module, lpath: str, layer: nn.Module, policy: Any, mods: Dict[str, nn.Module],
              targets: Dict[str, Any], samples: Dict[str, List[torch.Tensor]], result: Any) -> None:
    """Search, fold and quantize one layer's targets (``mods``: full path -> module) for AWQ."""
    prefix = f"{lpath}." if lpath else ""
    rel_of = {p: p[len(prefix):] for p in mods}
    groups = awq_groups(policy, layer) if policy is not None else []
    grouped = {lin for g in groups for lin in g.linears}
    groups += [AWQGroup((rel,), None, "none", "no policy names what precedes it")
               for rel in rel_of.values() if rel not in grouped]
    full = {rel: p for p, rel in rel_of.items()}
    inputs: Dict[str, torch.Tensor] = {p: torch.cat(s) for p, s in samples.items() if s}
    scales: Dict[str, torch.Tensor] = {}
    # 1. search every group's scales on the float inputs, before any fold changes them
    for g in groups:
        in_group = [full[r] for r in g.linears if r in full]
        if not in_group or g.absorber is None:
            continue
        t = targets[in_group[0]]
        x = inputs[in_group[0]]
        ws = [layer.get_submodule(r).weight.detach().to(torch.float32) if not targets[full[r]].transposed
              else layer.get_submodule(r).weight.detach().t().to(torch.float32) for r in g.linears if r in full]
        s = awq_mod.search_scales(x, ws, t.num_bits, t.group_size, t.symmetric)
        scales[g.absorber + "|" + g.linears[0]] = s
        _fold(layer, g, s, prefix, result)
        for r in g.linears:
            if r in full:
                inputs[full[r]] = x / s
    # 2. clip search and round to nearest, on the (folded) weights and the matching inputs
    for g in groups:
        for r in g.linears:
            if r not in full:
                continue
            path, t = full[r], targets[full[r]]
            mod = layer.get_submodule(r)
            w = mod.weight.detach().to(torch.float32)
            w = w.t() if t.transposed else w
            qw = awq_mod.awq_quantize_weight(w, inputs[path], t.num_bits, t.group_size, t.symmetric)
            deq = dequantize_weight(qw)
            with torch.no_grad():
                mod.weight.copy_((deq.t() if t.transposed else deq).to(mod.weight.dtype))
            result.weights[path] = qw
            result.notes[path] = (f"awq: scales folded into {prefix}{g.absorber}" if g.absorber is not None
                                  else f"awq: clip search only, no scales ({g.reason})")
            if g.absorber is None:
                log.info("awq %s: no input scales: %s", path, g.reason)


def _fold(layer: nn.Module, g: AWQGroup, s: torch.Tensor, prefix: str, result: Any) -> None:
    """Divide the absorber's output by ``s`` and multiply every linear of the group's input columns by ``s``
    (quantized or not: the float function is unchanged)."""
    absorber = layer.get_submodule(g.absorber)
    with torch.no_grad():
        if g.kind == "norm":
            for name in ("weight", "bias"):
                p = getattr(absorber, name, None)
                if isinstance(p, torch.Tensor):
                    p.div_(s.to(p.dtype))
                    result.folded[f"{prefix}{g.absorber}.{name}"] = p
        else:  # the rows of a preceding linear
            absorber.weight.div_(s.to(absorber.weight.dtype)[:, None])
            result.folded[f"{prefix}{g.absorber}.weight"] = absorber.weight
            if absorber.bias is not None:
                absorber.bias.div_(s.to(absorber.bias.dtype))
                result.folded[f"{prefix}{g.absorber}.bias"] = absorber.bias
        for r in g.linears:
            mod = layer.get_submodule(r)
            if type(mod).__name__ == "Conv1D":
                mod.weight.mul_(s.to(mod.weight.dtype)[:, None])
            else:
                mod.weight.mul_(s.to(mod.weight.dtype)[None, :])
            result.folded[f"{prefix}{r}.weight"] = mod.weight
