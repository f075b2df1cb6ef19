"""``init_inference``: load the config, collect policies, match, plan every pass, then apply them in order.

Planning never mutates the model: if any pass fails to plan (a bad policy, a rule that cannot apply, head
counts that cannot split), :class:`policyinject.errors.PlanError` is raised and the user's model is exactly
as it was.

Example:
    >>> import torch, policyinject as pi
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> engine = pi.init_inference(model, dtype="fp32")
    >>> engine(torch.ones(1, 4)).shape
    torch.Size([1, 4])
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any, Optional

import torch

from .config import InferenceConfig, load_config
from .engine import InferenceEngine
from .errors import PlanError, UnsupportedError
from .matching import lint_linears, match_layers
from .passes.base import Pass, PassContext
from .plan import Plan
from .plugins import PluginManager
from .policy import Policy

#: (config test, pass module, pass class, the config key that asks for it), in the fixed pass order.
PASS_ORDER = (
    ("dtype", "policyinject.passes.dtype", "DtypePass", "dtype"),
    ("tensor_parallel", "policyinject.passes.tensor_parallel", "TensorParallelPass", "tensor_parallel.tp_size"),
    ("quantize", "policyinject.passes.quantize", "QuantizePass", "quant"),
    ("kernel_inject", "policyinject.passes.kernel_inject", "KernelInjectPass", "replace_with_kernel_inject"),
    ("cuda_graph", "policyinject.passes.cuda_graph", "CudaGraphPass", "enable_cuda_graph"),
)


def _wanted(name: str, config: InferenceConfig) -> bool:
    if name == "dtype":
        return True
    if name == "tensor_parallel":
        return config.tensor_parallel.tp_size > 1 or bool(getattr(config, "checkpoint", None))
    if name == "quantize":
        return _quant_requested(config)
    if name == "kernel_inject":
        return bool(config.replace_with_kernel_inject)
    if name == "cuda_graph":
        return bool(config.enable_cuda_graph)
    return False


def _quant_requested(config: InferenceConfig) -> bool:
    """Quantization is opt-in: ``quant.enabled`` (set by a ``quant`` section or by ``dtype=int8``)."""
    return bool(config.quant.enabled)


def build_passes(config: InferenceConfig) -> list:
    """Instantiate the passes the config asks for, in the fixed order; a pass not available is an error."""
    passes: list = []
    for name, module_name, class_name, key in PASS_ORDER:
        if not _wanted(name, config):
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise UnsupportedError(
                f"`{key}` asks for the {name} pass, which this version of policyinject does not provide yet"
            ) from None
        cls = getattr(module, class_name)
        p: Pass = cls()
        if p.enabled(config):
            passes.append(p)
    return passes


def target_device(model: torch.nn.Module, config: InferenceConfig) -> torch.device:
    """CUDA (``LOCAL_RANK``'s device under torchrun) when available, else where the model already is."""
    if getattr(config, "keep_module_on_host", False):
        return torch.device("cpu")
    for p in model.parameters():
        if p.device.type not in ("cpu", "meta"):
            return p.device
        break
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def user_policies(config: InferenceConfig, model: Optional[torch.nn.Module] = None) -> list:
    """``injection_policy`` entries converted to :class:`Policy` objects (they win over plugins)."""
    raw = getattr(config, "injection_policy", None) or {}
    # A key written as a name is a ClassRef, never imported: match it to the model's classes here (no import,
    # PolicyError naming the key when it names none). See policyinject/config/class_ref.py.
    from .config.class_ref import resolve_injection_policy

    pairs = resolve_injection_policy(raw, model)
    out = []
    for key, value in pairs:
        layer = key
        if isinstance(value, Policy):
            policy = value if value.layer == layer else _with_layer(value, layer)
        else:
            from .policy.shortforms import from_deepspeed

            policy = from_deepspeed(layer, value)
        out.append(policy.with_source("injection_policy"))
    return out


def _with_layer(policy: Policy, layer: Any) -> Policy:
    import attrs

    return attrs.evolve(policy, layer=layer)


def plan_inference(model: torch.nn.Module, config: InferenceConfig,
                   plugins: Optional[PluginManager] = None) -> tuple:
    """Plan without mutating: returns ``(plan, context, passes)``. Raises PlanError on any problem."""
    manager = plugins if plugins is not None else PluginManager.default()
    collected = manager.collect()
    extra_user, extra_model = _tp_plan_policies(model, config)
    matched = match_layers(
        model,
        user=user_policies(config, model) + extra_user,
        plugins=list(collected.layer_policies),
        model_policies=list(extra_model) + list(collected.model_policies),
        select=manager.select_policy,
    )
    ctx = PassContext(
        model=model,
        config=config,
        layers=matched.layers,
        model_policy=matched.model_policy,
        model_config=getattr(config, "config", None) or getattr(model, "config", None),
        device=target_device(model, config),
    )
    plan = Plan()
    for message in matched.lint + lint_linears(matched.layers):
        plan.warn(message)
    passes = build_passes(config)
    problems: list = []
    per_pass: list = []
    for p in passes:
        try:
            actions = p.plan(ctx)
        except PlanError as exc:
            problems.extend(f"{p.name}: {m}" for m in exc.problems)
            continue
        plan.extend(actions)
        per_pass.append((p, actions))
    if problems:
        raise PlanError(problems)
    plan.summary["layers matched"] = len(matched.layers)
    quant = ctx.notes.get("quantize")
    if quant:
        plan.summary["weight bytes (planned)"] = (
            f"{quant['model_bytes_before'] / 2**30:.3f} GiB -> {quant['model_bytes_after'] / 2**30:.3f} GiB "
            f"({quant['ratio']:.2f}x; the {quant['linears']} quantized linears "
            f"{quant['linear_bytes_after'] / max(quant['linear_bytes_before'], 1):.2f}x at {quant['bits']} bits)")
    if matched.model_policy is not None:
        plan.summary["model policy"] = f"{matched.model_policy.model_name} ({matched.model_policy.source})"
    plan.summary["device"] = str(ctx.device)
    return plan, ctx, per_pass


def _tp_plan_policies(model: torch.nn.Module, config: InferenceConfig) -> tuple:
    tp_plan = getattr(getattr(config, "tensor_parallel", None), "tp_plan", None)
    if not isinstance(tp_plan, dict) or not tp_plan:
        return [], []
    from .policy.shortforms import from_hf_plan

    return from_hf_plan(tp_plan, model)


def init_inference(model: torch.nn.Module, config: Any = None, *,
                   plugins: Optional[PluginManager] = None, **kwargs: Any) -> InferenceEngine:
    """Make ``model`` fast for inference and return an :class:`InferenceEngine` wrapping it.

    ``config`` is anything :func:`policyinject.load_config` takes (None, a dict, a JSON/YAML path, an
    ``InferenceConfig``); keyword arguments are merged in. The model is transformed in place, as
    DeepSpeed does; if planning fails it is left untouched.

    Example:
        >>> import torch, policyinject as pi
        >>> engine = pi.init_inference(torch.nn.Linear(2, 2), {"dtype": "fp32"})
        >>> engine.plan.actions[0].action
        'keep'
    """
    cfg = load_config(config, **kwargs)
    started = time.perf_counter()
    plan, ctx, per_pass = plan_inference(model, cfg, plugins)
    planned = time.perf_counter()
    timings = {}
    for p, actions in per_pass:
        t0 = time.perf_counter()
        if p.name == "cuda_graph":
            _place(ctx)
        p.apply(ctx, actions)
        timings[p.name] = round(time.perf_counter() - t0, 4)
    _place(ctx)
    _release_originals(plan, ctx)
    plan.summary["plan seconds"] = round(planned - started, 4)
    plan.summary["apply seconds"] = timings
    return InferenceEngine(model, cfg, plan, ctx)


def _release_originals(plan: Plan, ctx: PassContext) -> None:
    """Drop every reference to modules the passes replaced, so their weights are freed.

    Action payloads and the matched-layer list point at the original layers; kept alive by the engine,
    they would hold a second copy of every weight that kernel injection fused or TP sharded.
    """
    import attrs

    plan.actions[:] = [attrs.evolve(a, payload=None) if a.payload is not None else a for a in plan.actions]
    current = []
    for m in ctx.layers:
        try:
            current.append(attrs.evolve(m, module=ctx.module(m.path)))
        except AttributeError:
            continue
    ctx.layers = current


def _place(ctx: PassContext) -> None:
    if ctx.notes.get("placed"):
        return
    device = ctx.device or torch.device("cpu")
    if any(p.device.type == "meta" for p in ctx.model.parameters()):
        ctx.notes["placed"] = True
        return
    ctx.model.to(device)
    ctx.notes["placed"] = True
