"""``init_inference``: load the config, resolve every policy, plan every pass, then apply them in order.

Flow: ``load_config`` -> :func:`policyinject.policy.resolve.resolve_policies` (user forms, plugins, HF plans,
AutoTP heuristics) -> each pass of :data:`PASSES` that ``enabled(config)`` plans, writing actions and typed
plan fields -> each pass applies -> :class:`~policyinject.engine.InferenceEngine` (which builds its decoder
from ``plan.decode``).

Planning never mutates the model: if any pass fails to plan (a bad policy, a rule that cannot apply, head
counts that cannot split), :class:`policyinject.errors.PlanError` is raised and the user's model is exactly
as it was.

Example:
    >>> import torch, policyinject as pi
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> engine = pi.init_inference(model, dtype="fp32")
    >>> engine(torch.ones(1, 4)).shape
    torch.Size([1, 4])
    >>> [p.name for p in PASSES]
    ['dtype', 'tensor_parallel', 'quantize', 'kernel_inject', 'cuda_graph']
"""

from __future__ import annotations

import os
import time
from typing import Any, List, Optional, Tuple

import attrs
import torch

from .apply_guard import check_not_poisoned, fail, snapshot, unchanged, units_of
from .config import InferenceConfig, load_config
from .coverage import warn_if_nothing_injected
from . import preflight
from .engine import InferenceEngine
from .errors import PlanError
from .passes.base import Pass, PassContext
from .passes.cuda_graph import CudaGraphPass
from .passes.dtype import DtypePass
from .passes.kernel_inject import KernelInjectPass
from .passes.quantize import QuantizePass, resolve_method
from .passes.tensor_parallel import TensorParallelPass
from .plan import Plan
from ._plugin_manager import PluginManager
from .policy.resolve import resolve_policies
from .rank_agreement import announce

__all__ = ["PASSES", "Planned", "enabled_passes", "init_inference", "plan_inference", "prepare", "target_device"]

#: Every pass, in the fixed order they plan and apply; ``Pass.enabled(config)`` says which run.
PASSES: Tuple[type, ...] = (DtypePass, TensorParallelPass, QuantizePass, KernelInjectPass, CudaGraphPass)


def enabled_passes(config: InferenceConfig) -> List[Pass]:
    """Instances of the passes ``config`` asks for, in the fixed order.

    Example:
        >>> [p.name for p in enabled_passes(load_config(None, dtype="int8", replace_with_kernel_inject=True))]
        ['dtype', 'quantize', 'kernel_inject']
    """
    return [cls() for cls in PASSES if cls.enabled(config)]


def target_device(model: torch.nn.Module, config: InferenceConfig) -> torch.device:
    """CUDA (``LOCAL_RANK``'s device under torchrun) when available, else where the model already is.

    Example:
        >>> target_device(torch.nn.Linear(2, 2), load_config(None, keep_module_on_host=True))
        device(type='cpu')
    """
    if config.keep_module_on_host:
        return torch.device("cpu")
    for p in model.parameters():
        if p.device.type not in ("cpu", "meta"):
            return p.device
        break
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


@attrs.define
class Planned:
    """A plan with what applying it needs: the pass context and each enabled pass with its actions."""

    plan: Plan
    context: PassContext
    passes: List[Tuple[Pass, list]]


def prepare(model: torch.nn.Module, config: InferenceConfig, plugins: Optional[PluginManager] = None,
            memory_probe: Optional[preflight.MemoryProbe] = None) -> Planned:
    """Resolve policies and plan every enabled pass without mutating anything (PlanError on any problem).

    After the passes plan, :mod:`policyinject.preflight` checks kernel availability and the device memory
    applying the plan needs against what ``memory_probe`` (default: ``torch.cuda.mem_get_info``) says is free.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    check_not_poisoned(model)
    manager = plugins if plugins is not None else PluginManager.default()
    resolved = resolve_policies(model, config, manager, autotp=TensorParallelPass.enabled(config))
    plan = Plan(layers=resolved.layers, model_policy=resolved.model_policy, model_config=resolved.model_config)
    for message in resolved.lint:
        plan.warn(message)
    ctx = PassContext(model=model, config=config, layers=resolved.layers, model_policy=resolved.model_policy,
                      model_config=resolved.model_config, device=target_device(model, config),
                      autotp_model_policy=resolved.autotp_model_policy, plan=plan)
    if not TensorParallelPass.enabled(config):  # no group to agree with; say what this rank builds
        announce(model, config)
    problems: list = []
    per_pass: list = []
    for p in enabled_passes(config):
        try:
            actions = p.plan(ctx)
        except PlanError as exc:
            problems.extend(f"{p.name}: {m}" for m in exc.problems)
            continue
        plan.extend(actions)
        per_pass.append((p, actions))
    problems += preflight.kernel_problems(config, ctx.device or torch.device("cpu"), [p.name for p, _ in per_pass])
    if not problems:
        problems += preflight.weight_problems(model, config, [a for _, acts in per_pass for a in acts], ctx.layers)
    if problems:
        raise PlanError(problems)
    warn_if_nothing_injected(plan, model, config, manager, stacklevel=3)
    device = ctx.device or torch.device("cpu")
    on_meta = any(t.device.type == "meta" for t in model.parameters())
    if config.checkpoint or not on_meta:  # a meta model without a checkpoint materialises nothing
        estimate = preflight.estimate_memory(model, plan, ctx.layers, device, int(config.tensor_parallel.tp_size))
        memory = preflight.check_memory(estimate, memory_probe, device)
        if memory is not None:
            plan.summary["device memory (planned)"] = memory
    ctx.quantize_on_load = _quantize_on_load(config, per_pass)
    plan.summary["layers matched"] = len(resolved.layers)
    by: dict = {}
    for layer in resolved.layers:
        by[layer.resolved_by.value] = by.get(layer.resolved_by.value, 0) + 1
    if by:
        plan.summary["policies from"] = ", ".join(f"{k} {n}" for k, n in by.items())
    if plan.quantize is not None:
        plan.summary["weight bytes (planned)"] = plan.quantize.describe()
        if plan.quantize.skipped:
            plan.summary["linears not quantized"] = plan.quantize.describe_skipped()
    if resolved.model_policy is not None:
        plan.summary["model policy"] = f"{resolved.model_policy.model_name} ({resolved.model_policy.source})"
    plan.summary["device"] = str(ctx.device)
    return Planned(plan, ctx, per_pass)


def plan_inference(model: torch.nn.Module, config: Any = None, *, plugins: Optional[PluginManager] = None,
                   memory_probe: Optional[preflight.MemoryProbe] = None, **kwargs: Any) -> Plan:
    """What ``init_inference`` would do to ``model``, without changing it: the typed :class:`Plan`.

    ``config`` and keyword arguments are what :func:`policyinject.load_config` takes. The plan's public
    fields: ``layers`` (each resolved layer with its policy and how it was resolved), ``actions``, ``lint``,
    ``summary``, ``dtype``, ``tensor_parallel`` (the TP layout), ``quantize``, ``decode``; it prints as a
    table and ``plan.to_json()`` is JSON-able. Raises :class:`~policyinject.errors.PlanError` on any problem.

    Example:
        >>> import torch, policyinject as pi
        >>> plan = plan_inference(torch.nn.Sequential(torch.nn.Linear(4, 4)), dtype="fp32")
        >>> plan.actions[0].action, plan.dtype, plan.tensor_parallel is None
        ('keep', torch.float32, True)
        >>> sorted(plan.to_json())[:4]
        ['actions', 'dtype', 'layers', 'lint']
    """
    return prepare(model, load_config(config, **kwargs), plugins, memory_probe).plan


def init_inference(model: torch.nn.Module, config: Any = None, *, plugins: Optional[PluginManager] = None,
                   memory_probe: Optional[preflight.MemoryProbe] = None, **kwargs: Any) -> InferenceEngine:
    """Make ``model`` fast for inference and return an :class:`InferenceEngine` wrapping it.

    ``config`` is anything :func:`policyinject.load_config` takes (None, a dict, a JSON/YAML path, an
    ``InferenceConfig``); keyword arguments are merged in. The model is transformed in place, as
    DeepSpeed does; if planning fails (:class:`~policyinject.errors.PlanError`) it is left untouched. If
    applying fails part-way, :class:`~policyinject.errors.ApplyError` lists the converted and unconverted
    layers and the model's forward raises from then on (``docs/reliability.md``, "Atomicity of apply").
    ``memory_probe``: ``probe(device) -> (free, total)`` bytes, or None (:mod:`policyinject.preflight`).

    Example:
        >>> import torch, policyinject as pi
        >>> engine = pi.init_inference(torch.nn.Linear(2, 2), {"dtype": "fp32"})
        >>> engine.plan.actions[0].action
        'keep'
    """
    cfg = load_config(config, **kwargs)
    started = time.perf_counter()
    planned = prepare(model, cfg, plugins, memory_probe)
    plan, ctx = planned.plan, planned.context
    planned_at = time.perf_counter()
    for p, _ in planned.passes:  # e.g. tensor parallelism planned without a process group: nothing changed yet
        p.check_can_apply(ctx)
    timings = {}
    completed: List[str] = []
    layer_paths = [m.path for m in ctx.layers]
    start = snapshot(model, [""])  # the whole model: every module and tensor
    for p, actions in planned.passes + [(None, [])]:
        name = p.name if p is not None else "place"
        units = units_of(layer_paths, (a.path for a in actions))
        before = snapshot(model, units)
        ctx.building = None
        t0 = time.perf_counter()
        try:
            if p is None or isinstance(p, CudaGraphPass):
                _place(ctx)
            if p is not None:
                p.apply(ctx, actions)
        except BaseException as exc:  # poison the model whatever stopped apply, then say what is left
            if isinstance(exc, PlanError) and unchanged(model, start):
                raise  # a check as a pass started, nothing changed yet: the PlanError's promise holds
            err = fail(model, name, completed, units, before, ctx.building, exc)
            if not isinstance(exc, Exception):
                raise
            raise err from exc
        completed.append(name)
        if p is not None:
            timings[p.name] = round(time.perf_counter() - t0, 4)
    _release_originals(ctx)
    plan.summary["plan seconds"] = round(planned_at - started, 4)
    plan.summary["apply seconds"] = timings
    return InferenceEngine(model, cfg, plan)


def _quantize_on_load(config: InferenceConfig, per_pass: list) -> dict:
    """Linear path -> quantize payload for the linears read from a ``checkpoint`` and quantized as read.

    Only round-to-nearest and HQQ quantize one linear alone (calibrated methods and ``quant.checkpoint`` need
    the whole model, so they keep quantizing in the quantize pass).
    """
    actions = {p.name: acts for p, acts in per_pass}
    if not any(a.action == "load_checkpoint" for a in actions.get("tensor_parallel", ())):
        return {}
    if getattr(config.quant, "checkpoint", None) or config.save_mp_checkpoint_path:
        return {}  # a stored quantized checkpoint, or 16-bit shards to save: quantize in the quantize pass
    return {a.path: a.payload for a in actions.get("quantize", ())
            if a.action == "quantize" and resolve_method(a.payload.method, a.payload.num_bits,
                                                          a.payload.symmetric) in ("rtn", "hqq")}


def _release_originals(ctx: PassContext) -> None:
    """Drop every reference to modules the passes replaced, so their weights are freed.

    Action payloads and the resolved-layer list point at the original layers; kept alive by the engine,
    they would hold a second copy of every weight that kernel injection fused or TP sharded.
    """
    plan = ctx.plan
    plan.actions[:] = [attrs.evolve(a, payload=None) if a.payload is not None else a for a in plan.actions]
    current = []
    for m in ctx.layers:
        try:
            current.append(attrs.evolve(m, module=ctx.module(m.path)))
        except AttributeError:
            continue
    ctx.layers = current
    plan.layers = current


def _place(ctx: PassContext) -> None:
    """Move the model to the target device once (not a model with parameters left on the meta device)."""
    if ctx.placed:
        return
    ctx.placed = True
    if any(p.device.type == "meta" for p in ctx.model.parameters()):
        return
    ctx.model.to(ctx.device or torch.device("cpu"))
