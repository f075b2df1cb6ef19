"""Validation rules: per-field normalisation, rules between fields, and values we cannot honour.

Every function here returns problems or warnings instead of raising, so callers report them all at once.
Paths are canonical: relative to the section for :func:`normalize_fields` and :func:`check_section`,
dotted from the top for :func:`check_config`. A key named inside a message is written in backticks so
the loader can respell it the way the user wrote it.

Example:
    >>> from policyinject.config.model import InferenceConfig
    >>> InferenceConfig(min_out_tokens=8, max_out_tokens=4)
    Traceback (most recent call last):
    ...
    policyinject.config.errors.ConfigError: min_out_tokens: must be <= `max_out_tokens` (4), got 8
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .errors import ConfigWarning, InvalidValue, Problem, short_repr
from .keys import SPECS, Status, section_specs


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _show(value: Any) -> str:
    """A value as a message shows it (tuples as lists, long reprs cut)."""
    return short_repr(list(value) if isinstance(value, tuple) else value, typed=False)


def _differs(value: Any, default: Any) -> bool:
    """``value != default``, safe for user objects whose comparison raises or is not a bool."""
    if value is default:
        return False
    try:
        return bool(value != default)
    except Exception:
        return True


def normalize_fields(obj: Any, section: str) -> list:
    """Convert every leaf field of an attrs config in place (``object.__setattr__``); return the problems.

    Paths are relative to ``section``; a mapping-valued key reports each bad entry (``tp_plan['x']``).
    """
    problems = []
    for spec in section_specs(section):
        if spec.section or not spec.field:
            continue
        value = getattr(obj, spec.name)
        try:
            converted = spec.convert(value)
        except InvalidValue as e:
            problems.extend(Problem(spec.name + sub, message) for sub, message in e.problems)
            continue
        if converted is not value:
            object.__setattr__(obj, spec.name, converted)
    for spec in section_specs(section):
        if spec.section:
            cls_name = type(getattr(obj, spec.name)).__name__
            if cls_name != spec.cls:
                problems.append(Problem(spec.name, f"expected a {spec.cls}, got {_show(getattr(obj, spec.name))} "
                                                   "(give a mapping through load_config)"))
    return problems


def _unsupported(obj: Any, section: str) -> list:
    """Problems for ``error``-status keys set to a non-default value."""
    out = []
    for spec in section_specs(section):
        if spec.status is Status.ERROR and spec.field:
            value = getattr(obj, spec.name)
            if _differs(value, spec.default):
                out.append(Problem(spec.name, f"{_show(value)} is not supported: {spec.note}"))
    return out


def check_section(obj: Any, section: str) -> list:
    """The rules inside one nested section (problem paths relative to it)."""
    problems = _unsupported(obj, section)
    if section == "tensor_parallel" and obj.enabled is False and obj.tp_size > 1:
        problems.append(Problem("enabled", f"is false but `tp_size` is {obj.tp_size}; give one of them"))
    if section == "quant.weight" and obj.group_size is not None and obj.q_groups != 1:
        problems.append(Problem("group_size", f"cannot be combined with `q_groups` ({obj.q_groups}); give one"))
    return problems


def check_config(cfg: Any) -> list:
    """Rules of the top level and between sections (problem paths dotted from the top)."""
    problems = _unsupported(cfg, "")
    if cfg.min_out_tokens > cfg.max_out_tokens:
        problems.append(Problem(
            "min_out_tokens", f"must be <= `max_out_tokens` ({cfg.max_out_tokens}), got {cfg.min_out_tokens}"
        ))
    ep = cfg.moe.ep_size
    given = () if tuple(cfg.moe.moe_experts) == (1,) else cfg.moe.moe_experts  # (1,): read from the model
    for count in given:
        if count % ep:
            problems.append(Problem(
                "moe.ep_size", f"{ep} does not divide `moe.moe_experts` {count}: experts are split evenly over the "
                "expert-parallel ranks"))
    if ep > 1 and not cfg.moe.enabled:
        problems.append(Problem("moe.enabled", f"is false but `moe.ep_size` is {ep}; give one of them"))
    if ep > 1 and not cfg.replace_with_kernel_inject:
        problems.append(Problem(
            "moe.ep_size", f"{ep} needs `replace_with_kernel_inject` true: the expert-parallel MoE block is the "
            "injected one"))
    if ep > 1 and cfg.enable_cuda_graph:
        problems.append(Problem(
            "enable_cuda_graph", f"cannot be combined with `moe.ep_size` = {ep} (graphs are captured per process "
            "and replaying collectives across ranks is not supported)"))
    if cfg.dtype == "int8":
        weight = cfg.quant.weight
        if weight.num_bits != 8:
            problems.append(Problem(
                "dtype", f"int8 means 8-bit weight quantization, but `quant.weight.num_bits` is {weight.num_bits}"
            ))
        if not weight.enabled:
            problems.append(Problem("dtype", "int8 means weight quantization, but `quant.weight.enabled` is false"))
    return problems


def check_explicit(settings: Mapping[str, Any]) -> list:
    """Rules that depend on which keys were *given* (``settings``: canonical path -> value as given).

    Example:
        >>> [str(p) for p in check_explicit({"quant.enabled": False, "dtype": "int8"})]
        ['quant.enabled: is false, but `dtype` int8 turns weight quantization on']
    """
    problems = []
    if settings.get("quant.enabled") is False and _is_int8(settings.get("dtype")):
        problems.append(Problem("quant.enabled", "is false, but `dtype` int8 turns weight quantization on"))
    return problems


def _is_int8(value: Any) -> bool:
    try:
        return SPECS["dtype"].convert(value) == "int8"
    except Exception:
        return False


def unsupported_warnings(cfg: Any) -> list:
    """A ``UserWarning`` record per ``warns``-status key set to a non-default value (canonical paths).

    Example:
        >>> from policyinject.config.model import InferenceConfig
        >>> [w.message for w in unsupported_warnings(InferenceConfig(use_triton=True))]
        ['`use_triton` = True is ignored here: injected kernels are already Triton on CUDA; choose with `kernel_backend`']
    """
    out = []
    for path, value in _leaves(cfg, ""):
        spec = SPECS[path]
        if spec.status is Status.WARNS and _differs(value, spec.default):
            out.append(ConfigWarning(UserWarning, path, f"`{path}` = {_show(value)} is ignored here: {spec.note}"))
    return out


def _leaves(obj: Any, section: str) -> Iterable:
    for spec in section_specs(section):
        if not spec.field:
            continue
        value = getattr(obj, spec.name)
        if spec.section:
            yield from _leaves(value, spec.path)
        else:
            yield spec.path, value


#: Sections of ``quant`` whose keys only matter when ``quant.enabled`` is true (``quant.activation`` has
#: its own statuses: every non-default value there already warns or is an error).
_QUANT_USED_WHEN_ENABLED = ("quant.weight", "quant.qkv", "quant.lm_head", "quant.calibration")


def inert_warnings(cfg: Any, given: Iterable[str] = ()) -> list:
    """A ``UserWarning`` record per key set to a value that does nothing in this configuration.

    ``given``: the canonical paths the user wrote (the loader's), to tell a default from an explicit value.

    - ``quant.*`` settings (other than switching something off) while ``quant.enabled`` is false by default
      (not given; DeepSpeed's default is true): no weight is quantized, so they have no effect. An explicit
      ``quant.enabled: false`` says so already (DeepSpeed configs write the whole section that way);
    - ``quant.calibration.damp`` / ``gptq_grid`` set while the method is not ``gptq``, and ``gptq_grid: hqq``
      where it cannot apply (without ``act_order``, or weights other than asymmetric int4);
    - ``save_mp_checkpoint_path`` without tensor parallelism (``tp_size`` 1) or a ``checkpoint`` to load:
      the resharded checkpoint is written by the tensor-parallel pass, which then does not run.

    Example:
        >>> from policyinject.config import load_config
        >>> [w.path for w in inert_warnings(load_config(quant={"weight": {"num_bits": 4}}))]
        ['quant.weight.num_bits']
        >>> inert_warnings(load_config(quant={"enabled": True, "weight": {"num_bits": 4}}))
        []
    """
    out = []
    if not cfg.quant.enabled and "quant.enabled" not in set(given):
        inert = [(path, value) for section in _QUANT_USED_WHEN_ENABLED
                 for path, value in _leaves(_section(cfg, section), section)
                 if _differs(value, SPECS[path].default) and not (path.endswith(".enabled") and value is False)]
        if cfg.quant.checkpoint is not None:
            inert.insert(0, ("quant.checkpoint", cfg.quant.checkpoint))
        for path, value in inert:
            out.append(ConfigWarning(UserWarning, path, (
                f"`{path}` = {_show(value)} has no effect: `quant.enabled` is false (its default), so no weight is "
                "quantized (set `quant.enabled` true, or `dtype` int8)")))
    if cfg.quant.enabled:
        out += _gptq_only_warnings(cfg.quant)
    if cfg.save_mp_checkpoint_path and cfg.tensor_parallel.tp_size == 1 and not cfg.checkpoint:
        out.append(ConfigWarning(UserWarning, "save_mp_checkpoint_path", (
            f"`save_mp_checkpoint_path` = {_show(cfg.save_mp_checkpoint_path)} writes nothing: the resharded "
            "checkpoint is written when the model is split (`tensor_parallel.tp_size` > 1) or loaded from a "
            "`checkpoint`, and neither is set")))
    return out


def _section(cfg: Any, section: str) -> Any:
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    return obj


def _gptq_only_warnings(quant: Any) -> list:
    """Warnings for the GPTQ-only calibration keys set where they change nothing (see :func:`inert_warnings`)."""
    w, cal, out = quant.weight, quant.calibration, []
    for key in ("damp", "gptq_grid"):
        path = f"quant.calibration.{key}"
        value = getattr(cal, key)
        if not _differs(value, SPECS[path].default):
            continue
        if w.method != "gptq":
            why = f"`quant.weight.method` is {w.method!r}; only gptq reads it"
        elif key == "gptq_grid" and not cal.act_order:
            why = "`quant.calibration.act_order` is false; the grid is that of act-order's static groups"
        elif key == "gptq_grid" and (w.num_bits != 4 or w.symmetric):
            why = "the hqq grid applies to asymmetric int4 weights only; these use each group's range"
        else:
            continue
        out.append(ConfigWarning(UserWarning, path, f"`{path}` = {_show(value)} has no effect: {why}"))
    return out
