"""The quantize pass: weight-only int8 / int4 quantization of the linears each layer policy names.

Runs after the dtype and tensor-parallel passes (so each rank quantizes its own shard, and the scales are
split with their weights) and before kernel injection (which fuses the resulting :class:`QuantLinear`s with
``QuantLinear.cat``). Attention q/k/v (or fused qkv) projections are quantized only when
``quant.qkv.enabled``; the output head and embeddings are not layer linears and stay 16-bit.

Config read (``InferenceConfig``): ``quant.enabled``, ``quant.weight.enabled``, ``quant.weight.num_bits``
(8 or 4), ``quant.weight.q_type`` (``symmetric``/``asymmetric``; ``auto``, the default: symmetric at 8 bits,
asymmetric at 4), ``quant.weight.group_size`` (wins), else ``quant.weight.q_groups`` (groups per row:
``group_size = in_features / q_groups``; 1, the default, means one scale per output channel at 8 bits and the
default group -- 32, else per output channel -- at 4 bits), ``quant.weight.method`` (``auto``: HQQ for
asymmetric 4 bits, else round to nearest; ``rtn``; ``hqq``, asymmetric only: see
:mod:`policyinject.kernels.quant_search`), ``quant.qkv.enabled``, ``kernel_backend``, ``tensor_parallel.tp_size``.
So the int8 default is symmetric, per output channel, round to nearest; the int4 default asymmetric, group 32,
HQQ.

Each linear becomes one :class:`Action` (``quantize``, with bits, group size, symmetry and bytes before/after
for this rank, whose local shape the tensor-parallel layout gives: ``plan.tensor_parallel.local_shapes``) or
``keep`` (with the reason). ``plan.quantize`` (:class:`~policyinject.plan_fields.QuantizeSummary`) holds the
summary.

Example:
    >>> import torch
    >>> from policyinject.config import load_config
    >>> from policyinject.policy import Policy, MLPSpec
    >>> from policyinject.passes.base import PassContext, ResolvedLayer
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1, self.fc2 = torch.nn.Linear(192, 256), torch.nn.Linear(256, 192)
    >>> block = Block()
    >>> policy = Policy(Block, mlp=MLPSpec(fc1="fc1", fc2="fc2"))
    >>> cfg = load_config(None, kernel_backend="torch",  # symmetric int4 (the int4 default is asymmetric, HQQ)
    ...                   quant={"enabled": True, "weight": {"num_bits": 4, "q_type": "symmetric"}})
    >>> ctx = PassContext(model=block, config=cfg, layers=[ResolvedLayer("", block, policy)])
    >>> p = QuantizePass()
    >>> actions = p.plan(ctx)
    >>> [(a.path, a.details["bits"], a.details["group_size"], a.details["method"]) for a in actions]
    [('fc1', 4, 32, 'rtn'), ('fc2', 4, 32, 'rtn')]
    >>> p.apply(ctx, actions)
    >>> type(block.fc1).__name__, round(ctx.plan.quantize.ratio, 2)
    ('QuantLinear', 0.14)
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Tuple

import attrs
import torch
from torch import nn

from ..config.model import resolve_q_type
from ..errors import NothingQuantizedWarning, PlanError
from ..kernels.quant_search import hqq_quantize_weight
from ..kernels.quantize import default_group_size, resolve_group_size
from ..modules.quant_linear import QuantLinear
from .._nn import is_conv1d, set_submodule, shape_out_in
from ..plan import Action
from ..plan_fields import QuantizeSummary
from .base import Pass, PassContext, owner_of
from .quant_select import float_expert_weights, select_linears

__all__ = ["QuantizePass", "QuantSpec", "quantize_linear", "quantize_action", "quant_spec_from_config",
           "resolve_method", "METHODS", "NothingQuantizedWarning", "nothing_quantized_message"]

NAME = "quantize"

#: How the plan's lint line about routed experts left in floating point begins.
EXPERTS_STAY_FLOAT = "quantization: routed expert weights stay in floating point"

#: ``quant.weight.method`` values: ``auto`` resolves per bit width (:func:`resolve_method`).
METHODS = ("auto", "rtn", "hqq", "gptq", "awq")


def resolve_method(method: str, num_bits: int, symmetric: bool = False) -> str:
    """The quantization method actually used: ``auto`` is ``hqq`` for asymmetric 4 bits, else ``rtn``.

    Round-to-nearest int8 is already within 1% perplexity (docs/quantization.md); for asymmetric int4, HQQ's
    search of each group's zero point cuts the perplexity loss on both measured models with no calibration
    data. HQQ moves zero points, so it needs ``q_type: asymmetric`` (``hqq`` with symmetric is a plan error).

    Example:
        >>> resolve_method("auto", 4), resolve_method("auto", 4, symmetric=True), resolve_method("auto", 8)
        ('hqq', 'rtn', 'rtn')
    """
    if method not in METHODS:
        raise PlanError(f"quant.weight.method must be one of {', '.join(METHODS)}; got {method!r}")
    if method == "auto":
        return "hqq" if (num_bits == 4 and not symmetric) else "rtn"
    if method in ("gptq", "awq") and num_bits not in (4, 8):
        raise PlanError(f"quant.weight.method {method!r} quantizes to 4 or 8 bits, not {num_bits}")
    if method == "hqq" and symmetric:
        raise PlanError("quant.weight.method 'hqq' searches zero points: it needs quant.weight.q_type "
                        "'asymmetric' (symmetric weights use round to nearest)")
    return method


def nothing_quantized_message(model: nn.Module, spec: "QuantSpec", skipped: dict) -> str:
    """The one-line message of :class:`NothingQuantizedWarning`.

    Example:
        >>> nothing_quantized_message(torch.nn.Identity(), QuantSpec(exclude=("*",)), {})
        "quantization (8 bits) asked for, but nothing in Identity is quantized: the model has no linear (nn.Linear or Conv1D); quant.weight.include=None, quant.weight.exclude=('*',); see `policyinject inspect`"
    """
    if skipped:
        reasons: dict = {}
        for reason in skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        why = "; ".join(f"{n} skipped: {r}" for r, n in list(reasons.items())[:4])
    else:
        why = "the model has no linear (nn.Linear or Conv1D)"
    return (f"quantization ({spec.num_bits} bits) asked for, but nothing in {type(model).__name__} is quantized: "
            f"{why}; quant.weight.include={spec.include!r}, quant.weight.exclude={spec.exclude!r}; "
            "see `policyinject inspect`")


@attrs.frozen
class QuantSpec:
    """What the config asks for, independent of any one linear."""

    num_bits: int = 8
    symmetric: bool = True
    q_groups: Optional[int] = None
    group_size: Optional[int] = None
    qkv: bool = True
    backend: str = "auto"
    lm_head: bool = False
    method: str = "auto"
    #: ``quant.weight.include`` / ``exclude`` module-name patterns (None: not given).
    include: Optional[Tuple[str, ...]] = None
    exclude: Optional[Tuple[str, ...]] = None


def quant_spec_from_config(config: Any) -> QuantSpec:
    """Read the quantization settings from an ``InferenceConfig``.

    ``q_type`` ``auto`` (the default) resolves by bit width (:func:`policyinject.config.model.resolve_q_type`).

    Example:
        >>> from policyinject.config import load_config
        >>> spec = quant_spec_from_config(load_config(None, dtype="int8"))
        >>> spec.num_bits, spec.symmetric, spec.q_groups, spec.lm_head, spec.method
        (8, True, 1, False, 'auto')
        >>> spec = quant_spec_from_config(load_config(quant={"enabled": True, "weight": {"num_bits": 4}}))
        >>> spec.num_bits, spec.symmetric, resolve_method(spec.method, spec.num_bits, spec.symmetric)
        (4, False, 'hqq')
    """
    quant, weight = config.quant, config.quant.weight
    num_bits = int(weight.num_bits)
    q_type = resolve_q_type(str(weight.q_type).lower(), num_bits)
    if q_type in ("sym", "symmetric"):
        symmetric = True
    elif q_type in ("asym", "asymmetric"):
        symmetric = False
    else:
        raise PlanError(f"quant.weight.q_type must be 'auto', 'symmetric' or 'asymmetric', got {q_type!r}")
    q_groups = weight.q_groups
    group_size = weight.group_size
    qkv = bool(quant.qkv.enabled)
    backend = str(config.kernel_backend)
    lm_head = bool(quant.lm_head.enabled)
    method = str(weight.method).lower()
    resolve_method(method, num_bits, symmetric)  # raises PlanError for an unknown or impossible method
    return QuantSpec(num_bits, symmetric, None if q_groups is None else int(q_groups),
                     None if group_size is None else int(group_size), qkv, backend, lm_head, method,
                     weight.include, weight.exclude)


def plan_group_size(spec: QuantSpec, in_features: int, local_in: Optional[int] = None, where: str = "") -> int:
    """The group size for one linear of ``in_features`` inputs whose shard on this rank has ``local_in``.

    ``group_size`` wins; ``q_groups > 1`` gives ``in_features / q_groups``; otherwise the per-bit default,
    chosen so that it also divides ``local_in`` (a row-parallel shard). Raises ``PlanError`` naming ``where``.

    Example:
        >>> plan_group_size(QuantSpec(num_bits=4), 576, 288)
        32
        >>> plan_group_size(QuantSpec(num_bits=8, q_groups=1), 4096)
        4096
    """
    local_in = in_features if local_in is None else local_in
    try:
        if spec.group_size is not None:
            g = resolve_group_size(in_features, spec.num_bits, group_size=spec.group_size, name=f"{where} in_features")
        elif spec.q_groups is not None and spec.q_groups > 1:
            g = resolve_group_size(in_features, spec.num_bits, q_groups=spec.q_groups, name=f"{where} in_features")
        elif spec.num_bits == 8:
            g = in_features  # one scale per output channel: valid on any column shard
        else:
            g = default_group_size(in_features, 4)
            if local_in != in_features and local_in % g:
                g = default_group_size(local_in, 4)
                if in_features % g:
                    g = in_features
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if g != in_features and local_in % g:
        raise PlanError(
            f"{where}: this rank's {local_in} input features (of {in_features}) are not a multiple of "
            f"group_size={g}; choose a group size that divides the tensor-parallel shard"
        )
    return g


@attrs.frozen
class QuantizeLinear:
    """Payload of a ``quantize`` action: how to quantize one linear."""

    num_bits: int
    group_size: int
    per_channel: bool
    symmetric: bool
    backend: str
    transposed: bool
    method: str


def quantize_linear(
    module: nn.Module,
    num_bits: int = 8,
    group_size: Optional[int] = None,
    symmetric: bool = True,
    backend: str = "auto",
    *,
    transposed: bool = False,
    method: str = "rtn",
) -> nn.Module:
    """The quantized replacement of one linear-like module (the per-linear transform of the pass).

    * ``nn.Linear`` (or anything with a 2-D ``weight``): a :class:`QuantLinear`;
    * GPT-2 ``Conv1D`` (or ``transposed=True``): the same, from the transposed weight;
    * a tensor-parallel wrapper with an inner ``.local`` linear (``ColumnParallelLinear``,
      ``RowParallelLinear``): a shallow copy of the wrapper holding the quantized ``.local``, so its
      communication is unchanged (the wrapper passed in is not modified);
    * a module with a ``policyinject_quantize(num_bits, group_size, symmetric, backend)`` method: its result;
    * a ``QuantLinear``: returned as is.

    ``method``: ``rtn`` (round to nearest, :func:`~policyinject.kernels.quantize.quantize_weight`), ``hqq``
    (:func:`~policyinject.kernels.quant_search.hqq_quantize_weight`: the same format with searched zero points;
    asymmetric only) or ``auto`` (:func:`resolve_method`).

    ``group_size`` None: the default for ``num_bits``; a group size that does not divide this module's (local)
    in_features raises ``ValueError``.

    Example:
        >>> quantize_linear(torch.nn.Linear(64, 8), 4, 32, backend="torch").group_size
        32
        >>> quantize_linear(torch.nn.Linear(64, 8), 4, 32, False, "torch", method="hqq").zeros.dtype
        torch.float16
    """
    if isinstance(module, QuantLinear):
        return module
    hook = getattr(module, "policyinject_quantize", None)
    if callable(hook):
        return hook(num_bits=num_bits, group_size=group_size, symmetric=symmetric, backend=backend)
    local = getattr(module, "local", None)
    if isinstance(local, nn.Module):
        inner = quantize_linear(local, num_bits, group_size, symmetric, backend, method=method)
        if inner is local:
            return module
        wrapper = copy.copy(module)  # a new wrapper sharing the communication settings; ``module`` is unchanged
        wrapper._modules = dict(module._modules)
        wrapper.local = inner
        return wrapper
    transposed = transposed or is_conv1d(module)
    resolved = resolve_method(method, num_bits, symmetric)
    if resolved in ("gptq", "awq"):
        raise ValueError(f"quant.weight.method {resolved!r} needs calibration data and runs over the whole model "
                         "(init_inference with quant.calibration), not one linear at a time")
    if resolved == "rtn":
        return QuantLinear.from_linear(module, num_bits, group_size, symmetric, backend, transposed=transposed)
    weight = module.weight.detach()
    qw = hqq_quantize_weight(weight.t() if transposed else weight, num_bits, group_size)
    bias = getattr(module, "bias", None)
    return QuantLinear.from_quantized(qw, None if bias is None else bias.detach().clone(), backend)


def _model_bytes(model: nn.Module, float_size: Optional[int] = None) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = float_size if (float_size and t.is_floating_point()) else t.element_size()
        total += t.numel() * size
    return total


def _quantize_action(spec: QuantSpec, path: str, cls: str, shape: tuple, local: tuple, size: int,
                     transposed: bool, on_cuda: bool, problems: list) -> Optional[Action]:
    """The planned ``quantize`` action of one linear of ``shape`` ``(out, in)`` (``local`` on this rank,
    ``size`` bytes per 16-bit element), or None with the reason appended to ``problems`` when its group size
    does not fit (the shard, or the Triton kernels on CUDA)."""
    (out_f, in_f), (local_out, local_in) = shape, local
    try:
        g = plan_group_size(spec, in_f, local_in, path)
    except PlanError as exc:
        problems.extend(exc.problems)
        return None
    multiple = 16 if spec.num_bits == 8 else 32
    if not (g == in_f or g % multiple == 0) and on_cuda and spec.backend != "torch":
        problems.append(f"{path}: group_size={g} is not supported by the Triton kernels (need a multiple of "
                        f"{multiple} or one group per row); set kernel_backend='torch'")
        return None
    groups = 1 if g == in_f else local_in // g
    after = local_out * local_in * spec.num_bits // 8 + local_out * groups * 2 * (1 if spec.symmetric else 2)
    details = {"bits": spec.num_bits, "group_size": g if g != in_f else "per-channel", "symmetric": spec.symmetric,
               "method": resolve_method(spec.method, spec.num_bits, spec.symmetric),
               "bytes_before": local_out * local_in * size, "bytes_after": after}
    if local_in != in_f or local_out != out_f:
        details["local"] = [local_out, local_in]
    payload = QuantizeLinear(spec.num_bits, g, g == in_f, spec.symmetric, spec.backend, transposed, spec.method)
    return Action(NAME, path, cls, "quantize", details, payload)


class QuantizePass(Pass):
    """Replace the policy-named linears by :class:`QuantLinear` (see the module docstring)."""

    name = NAME

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Weight quantization asked for (``quant.enabled``, also set by ``dtype="int8"``) and not switched
        off by ``quant.weight.enabled``."""
        return config.quantization_requested and bool(config.quant.weight.enabled)

    # ----------------------------------------------------------------------------------------------- plan
    def plan(self, ctx: PassContext) -> list:
        spec = quant_spec_from_config(ctx.config)
        if spec.num_bits not in (4, 8):
            raise PlanError(f"quant.weight.num_bits must be 8 or 4, got {spec.num_bits}")
        layout = ctx.plan.tensor_parallel  # planned before us: this rank's local shapes
        tp = layout.tp_size if layout is not None else 1
        float_dtype = ctx.plan.dtype
        float_size = torch.empty((), dtype=float_dtype).element_size() if isinstance(float_dtype, torch.dtype) else None
        on_cuda = ctx.device is not None and torch.device(ctx.device).type == "cuda"
        actions: list = []
        problems: list = []
        before_total = after_total = 0
        head_by_policy = spec.lm_head and ctx.model_policy is not None and bool(ctx.model_policy.lm_head)
        selection = select_linears(ctx.model, ctx.layers, ctx.model_policy, lm_head=spec.lm_head, qkv=spec.qkv,
                                   include=spec.include, exclude=spec.exclude, head_by_policy=head_by_policy)
        chosen = {c.path: c for c in selection.selected}
        for path, mod in ctx.model.named_modules():
            if path in selection.requested_skips:
                actions.append(Action(NAME, path, type(mod).__name__, "keep",
                                      {"reason": selection.requested_skips[path]}))
                continue
            candidate = chosen.get(path)
            if candidate is None:
                continue
            cls = type(mod).__name__
            out_f, in_f = shape_out_in(mod, candidate.transposed)
            local_out, local_in = layout.local_shape(path, (out_f, in_f)) if layout is not None else (out_f, in_f)
            size = float_size or getattr(mod, "local", mod).weight.element_size()
            action = _quantize_action(spec, path, cls, (out_f, in_f), (local_out, local_in), size,
                                      candidate.transposed, on_cuda, problems)
            if action is not None:
                before_total += action.details["bytes_before"]
                after_total += action.details["bytes_after"]
                actions.append(action)
        for pattern in selection.unused_excludes:
            ctx.plan.warn(f"quant.weight.exclude: {pattern!r} matches no linear of {type(ctx.model).__name__}")
            warnings.warn(f"quant.weight.exclude: {pattern!r} matches no linear of {type(ctx.model).__name__}",
                          UserWarning, stacklevel=2)
        head = self._plan_head(ctx, spec, float_size, on_cuda, problems) if head_by_policy and \
            ctx.model_policy.lm_head not in selection.skipped else None
        if head is not None:
            actions.append(head)
            if head.action == "quantize":
                before_total += head.details["bytes_freed"]
                after_total += head.details["bytes_after"]
        if problems:
            raise PlanError(problems)
        model_before = _model_bytes(ctx.model, float_size) // tp if tp > 1 else _model_bytes(ctx.model, float_size)
        quantized = tuple(a.path for a in actions if a.action == "quantize")
        skipped = dict(selection.skipped)
        if head is not None and head.action != "quantize":
            skipped[head.path] = head.details.get("reason", "kept")
        ctx.plan.quantize = QuantizeSummary(
            linears=len(quantized), bits=spec.num_bits,
            model_bytes_before=model_before, model_bytes_after=model_before - before_total + after_total,
            linear_bytes_before=before_total, linear_bytes_after=after_total, planned=True,
            quantized=quantized, skipped=skipped, include=spec.include, exclude=spec.exclude)
        experts = float_expert_weights(ctx.model, ctx.layers,
                                       bool(ctx.config.replace_with_kernel_inject and ctx.config.moe.enabled))
        if experts:
            first = next(iter(experts.items()))
            ctx.plan.warn(f"{EXPERTS_STAY_FLOAT} in {len(experts)} modules ({first[0]}: {first[1]}, ...): 3-D "
                          "parameters, not nn.Linear; a policy with Policy.moe and replace_with_kernel_inject=True "
                          "quantizes them (docs/moe.md)")
        if not quantized:
            message = nothing_quantized_message(ctx.model, spec, skipped)
            ctx.plan.warn(message)
            warnings.warn(message, NothingQuantizedWarning, stacklevel=2)
        return actions

    @staticmethod
    def _plan_head(ctx: PassContext, spec: QuantSpec, float_size: Optional[int], on_cuda: bool,
                   problems: list) -> Optional[Action]:
        """``quant.lm_head.enabled``: the output head (the model policy's ``lm_head``) as one more quantized
        linear. A head tied to the input embedding gets its own quantized copy (the embedding keeps the 16-bit
        tensor, so no bytes are freed); a head split over ranks (vocab-parallel) is kept, with the reason."""
        path = ctx.model_policy.lm_head if (spec.lm_head and ctx.model_policy is not None) else None
        if not path:
            return None
        try:
            mod = ctx.model.get_submodule(path)
        except AttributeError:
            problems.append(f"quant.lm_head.enabled: the model policy's lm_head {path!r} is not a submodule of "
                            f"{type(ctx.model).__name__}")
            return None
        cls = type(mod).__name__
        if type(mod) is not nn.Linear:
            return Action(NAME, path, cls, "keep", {"reason": f"quant.lm_head takes a plain nn.Linear head, not {cls}"})
        size = float_size or mod.weight.element_size()
        action = _quantize_action(spec, path, cls, (mod.out_features, mod.in_features),
                                  (mod.out_features, mod.in_features), size, False, on_cuda, problems)
        if action is not None:
            embed = ctx.model.get_input_embeddings() if hasattr(ctx.model, "get_input_embeddings") else None
            tied = embed is not None and getattr(embed, "weight", None) is mod.weight
            action.details.update(bytes_freed=0 if tied else action.details["bytes_before"], tied_to_embedding=tied)
        return action

    # ---------------------------------------------------------------------------------------------- apply
    def apply(self, ctx: PassContext, actions: list) -> None:
        """Quantize layer by layer: every replacement of a layer is built before any is swapped in, so a
        failure leaves that layer as it was (``docs/reliability.md``, "Atomicity of apply")."""
        before_model = _model_bytes(ctx.model)
        done = 0
        # ---- calibrated methods (gptq, awq) and quant.checkpoint: policyinject.quant.hook -------------
        from ..quant.hook import prepare_quantized

        prepared = prepare_quantized(ctx, actions)
        # ---------------------------------------------------------------------------------------------------
        layer_paths = [m.path for m in ctx.layers]
        groups: dict = {}
        for a in actions:
            if a.action == "quantize":
                groups.setdefault(owner_of(a.path, layer_paths), []).append(a)
        for owner, group in groups.items():
            ctx.building = owner
            built = []
            for a in group:
                mod = ctx.module(a.path)
                if isinstance(getattr(mod, "local", mod), QuantLinear):  # quantized as it was read (checkpoint)
                    done += 1
                    continue
                built.append((a.path, mod, quantize_action(a.path, mod, a.payload, prepared.get(a.path))))
            for path, mod, new in built:
                if new is not mod:
                    set_submodule(ctx.model, path, new)
                done += 1
            del built
        ctx.building = None
        after_model = _model_bytes(ctx.model)
        planned = ctx.plan.quantize
        ctx.plan.quantize = QuantizeSummary(
            linears=done, bits=planned.bits if planned is not None else 0, model_bytes_before=before_model,
            model_bytes_after=after_model,
            linear_bytes_before=planned.linear_bytes_before if planned is not None else 0,
            linear_bytes_after=planned.linear_bytes_after if planned is not None else 0, planned=False,
            **(planned.selection_fields() if planned is not None else {}))



def quantize_action(path: str, mod: nn.Module, p: QuantizeLinear, prepared: Any = None) -> nn.Module:
    """The quantized replacement of ``mod`` (at ``path``) for the planned payload ``p`` (``mod`` unchanged).

    ``prepared``: a :class:`~policyinject.kernels.quantize.QuantizedWeight` made already (calibrated methods,
    ``quant.checkpoint``), else the weights are quantized here by ``p.method``.
    """
    _, local_in = shape_out_in(mod, p.transposed)
    group = local_in if p.per_channel else p.group_size
    if local_in % group:
        raise ValueError(f"{path}: {local_in} input features on this rank are not a multiple of group_size={group}")
    if prepared is not None:  # policyinject.quant.hook
        bias = getattr(mod, "bias", None)
        return QuantLinear.from_quantized(prepared, None if bias is None else bias.detach().clone(), p.backend)
    return quantize_linear(mod, p.num_bits, group, p.symmetric, p.backend, transposed=p.transposed, method=p.method)
