"""AutoTP verification: a guessed tensor-parallel plan is proved on one process before any rank applies it.

A plan is *guessed* when it carries no head geometry of its own: AutoTP's heuristics, a model's own Hugging
Face plan, a ``tensor_parallel.tp_plan`` mapping, a DeepSpeed short form or any styles-only policy
(:func:`needs_verification`). For each distinct layer class and geometry (layers of one class whose per-layer
config gives other sizes are checked separately), one sample (a float32 CPU copy of the first such
layer, with fresh random weights so that no zero-initialised weight hides a wrong split) is checked:

- **statically**: every parameter and buffer outside the split linears whose size follows a split dimension
  (a per-head ``sinks`` vector, a convolution or a sub-norm between the column- and row-parallel linears)
  must be covered by the plan, and so must head-count attributes the plan does not rewrite;
- **packed outputs**: a column-parallel linear whose output the forward ``chunk``s or ``split``s along the
  features is packed (ModernBERT's ``Wi``: input | gate); a plain column split would hand every rank a wrong
  mix. A heuristic plan is corrected to ``packed_column`` (two equal parts), any other plan is refused;
- **by simulation**: every rank's shard is built by the same split code the pass uses
  (:class:`~policyinject.passes.tp_linears.LinearSplitter`, :func:`~policyinject.passes.tp_apply.build_parallel`,
  attribute rewrites), run on the layer's real inputs (captured from one forward of the model on a few
  tokens) with the collectives simulated (:mod:`policyinject.passes.tp_simulate`), and every rank's output
  must equal the unsharded layer's (relative error by norm <= 1e-5, NaN never passes).

A class that fails is refused with a :class:`~policyinject.errors.PlanError` naming the class, the parameter or
attribute, and how to write a policy -- before any rank changes anything. One check per class keeps it fast.

Example:
    >>> import torch
    >>> from policyinject.policy import Policy
    >>> from policyinject.policy.resolved import ResolvedLayer
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.heads = 4; self.qkv = torch.nn.Linear(64, 192); self.out = torch.nn.Linear(64, 64)
    ...     def forward(self, x):
    ...         b, t, _ = x.shape
    ...         q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).unbind(2)
    ...         y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ...         return x + self.out(y.transpose(1, 2).reshape(b, t, -1))
    >>> model = torch.nn.Module(); model.layers = torch.nn.ModuleList([Block()])
    >>> short = Policy(Block, styles={"out": "row"}, default_style="column", source="injection_policy")
    >>> try:
    ...     verify_layers(model, None, [ResolvedLayer("layers.0", model.layers[0], short)], tp=3, grain=8)
    ... except Exception as e:
    ...     print(type(e).__name__, str(e).splitlines()[0])
    PlanError AutoTP verification refused the plan for Block (layers.0, from injection_policy):
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._nn import shape_out_in
from ..checkpoint import ModuleSource
from ..distributed import TPInfo
from ..errors import PlanError
from ..policy.model import Policy, Style, is_linear_like
from ..policy.resolved import ResolvedBy, ResolvedLayer
from .tp_apply import build_parallel
from .tp_attributes import AttrRewrite, apply_attributes
from .tp_linears import LinearSplitter, Shard
from .tp_simulate import SimulatedCollectives, SimulationError
from .._nn import set_submodule

__all__ = ["needs_verification", "verify_layers", "verify_layer", "LayerVerdict", "RTOL"]

#: Relative error by norm a simulated rank's output may have against the unsharded layer (fp32).
RTOL = 1e-5
#: A layer larger than this (parameters) is not copied for the check: its first layer runs, shards copied.
_TOKENS = 5
_VERIFIED_SOURCES = (ResolvedBy.HEURISTIC, ResolvedBy.HF_PLAN, ResolvedBy.TP_PLAN)
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "num_kv_heads",
               "num_key_value_heads", "n_head_kv", "n_kv_heads", "kv_heads", "head_count", "n_local_heads")


def needs_verification(layer: ResolvedLayer) -> bool:
    """True for a guessed plan: AutoTP, an HF plan, a ``tp_plan`` mapping, or a policy with no roles.

    Example:
        >>> import torch
        >>> from policyinject.policy import Policy, AttentionSpec
        >>> lin = torch.nn.Linear(2, 2)
        >>> needs_verification(ResolvedLayer("0", lin, Policy(torch.nn.Linear, styles={"": "row"})))
        True
        >>> full = Policy(torch.nn.Linear, attention=AttentionSpec(q="q", k="k", v="v", o="o"))
        >>> needs_verification(ResolvedLayer("0", lin, full, "plugin"))
        False
    """
    if layer.resolved_by in _VERIFIED_SOURCES:
        return True
    p = layer.policy
    return getattr(p, "attention", None) is None and getattr(p, "mlp", None) is None and bool(p.styles or
                                                                                              p.default_style)


@attrs.define
class LayerVerdict:
    """The outcome of one class's check: the (possibly corrected) policy, problems, and what was checked."""

    policy: Policy
    problems: List[str] = attrs.field(factory=list)
    corrected: List[str] = attrs.field(factory=list)
    max_rel_err: float = 0.0
    collectives: int = 0
    #: why the sample could not run at all (a layer the model's forward does not reach, whose own forward
    #: needs inputs that cannot be made up): nothing is known about the plan, right or wrong
    unverifiable: str = ""


class _Captured(Exception):
    pass


def verify_layers(model: nn.Module, model_config: Any, layers: Sequence[ResolvedLayer], tp: int, grain: int,
                  notes: Optional[List[Tuple[str, str]]] = None) -> List[ResolvedLayer]:
    """Check every guessed layer plan (one sample per class); the layers with corrected policies, or PlanError.

    Nothing of ``model`` is changed: samples are copies, inputs come from one forward under ``no_grad``. A
    heuristic (AutoTP) plan for a layer the model's forward does not reach and whose forward cannot run on
    made-up inputs (a vision tower's layer under a text-only forward) cannot be proved: that layer is kept
    whole on every rank (always correct) and ``notes`` receives ``(path, reason)`` for the plan's lint. Any
    other unverifiable plan (an HF plan, a user's ``tp_plan`` or short form) is refused.
    """
    if tp <= 1:
        return list(layers)
    firsts: Dict[tuple, ResolvedLayer] = {}
    for layer in layers:
        if needs_verification(layer):
            firsts.setdefault(_geometry_key(layer), layer)
    if not firsts:
        return list(layers)
    twin = tiny_twin(model, tp, grain) if _needs_twin(model, firsts.values()) else None
    if twin is not None and any(_missing(twin, f.path) for f in firsts.values()):
        twin = None
    samples = {key: (twin.get_submodule(f.path) if twin is not None else f.module) for key, f in firsts.items()}
    inputs = capture_inputs(twin if twin is not None else model, list(samples.values()))
    config = twin.config if twin is not None else model_config
    problems: List[str] = []
    fixed: Dict[tuple, Policy] = {}
    for key, first in firsts.items():
        args = inputs.get(id(samples[key]))
        verdict = verify_layer(samples[key], first.policy, config, tp, grain, args, first.path,
                               correct=first.resolved_by is ResolvedBy.HEURISTIC)
        if verdict.unverifiable and first.resolved_by is ResolvedBy.HEURISTIC:
            fixed[key] = Policy(first.policy.layer, default_style=Style.REPLICATE,
                                source=f"{first.policy.source or 'AutoTP'} (unverifiable: replicated)")
            if notes is not None:
                notes.append((first.path, f"AutoTP could not verify its plan for {type(first.module).__name__} "
                                          f"({verdict.unverifiable}); these layers stay whole on every rank"))
        elif verdict.unverifiable:
            problems.append(_refusal(first, [verdict.unverifiable + ", so the plan cannot be verified"]))
        elif verdict.problems:
            problems.append(_refusal(first, verdict.problems))
        elif verdict.policy is not first.policy:
            fixed[key] = verdict.policy
    if problems:
        raise PlanError(problems)
    return [attrs.evolve(m, policy=fixed[_geometry_key(m)]) if needs_verification(m) and _geometry_key(m) in fixed
            else m for m in layers]


#: A layer with more parameters than this (or on the meta device) is checked on a tiny twin model instead.
MAX_SAMPLE_PARAMS = 16_000_000


def _missing(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return False
    except AttributeError:
        return True


def _needs_twin(model: nn.Module, firsts: Any) -> bool:
    if not hasattr(getattr(model, "config", None), "to_dict"):
        return False
    for f in firsts:
        params = list(f.module.parameters())
        if any(p.device.type == "meta" for p in params) or sum(p.numel() for p in params) > MAX_SAMPLE_PARAMS:
            return True
    return False


#: Width-like config attributes a tiny twin shrinks (head counts, layer counts and layer types are kept).
_TWIN_WIDTHS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
                "shared_expert_intermediate_size", "decoder_ffn_dim")


def tiny_twin(model: nn.Module, tp: int, grain: int) -> Optional[nn.Module]:
    """A Hugging Face model of the same class with the same head counts and layers but small widths (head_dim
    8, MLP widths a multiple of ``tp * grain``), float32 on the CPU; None when it cannot be built or runs."""
    cfg = copy.deepcopy(model.config)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    try:
        hd = 8
        if hasattr(cfg, "head_dim"):
            cfg.head_dim = hd
        cfg.hidden_size = heads * hd
        unit = tp * max(grain, 8)
        width = next(k * unit for k in range(2, 64) if k * unit != cfg.hidden_size)  # kept apart from hidden
        for name in _TWIN_WIDTHS:
            if isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, width)
        if isinstance(getattr(cfg, "vocab_size", None), int):
            cfg.vocab_size = tp * max(grain, 8) * 2
        with torch.device("cpu"):
            twin = type(model)(cfg)
        return twin.float().eval()
    except Exception:  # noqa: BLE001 - the real layers are used instead
        return None


def _geometry_key(layer: ResolvedLayer) -> tuple:
    """One check per layer class *and* geometry: layers of one class whose per-layer config gives other sizes
    (sliding-window layers with other head counts, global vs local head sizes) are checked separately."""
    shapes = tuple((n, tuple(p.shape)) for n, p in layer.module.named_parameters())
    sizes = tuple(sorted((f"{n}.{k}", v) for n, m in layer.module.named_modules() for k, v in vars(m).items()
                         if not k.startswith("_") and type(v) in (int, bool) and k != "layer_idx"))
    return type(layer.module), id(layer.policy), shapes, sizes


def _refusal(first: ResolvedLayer, problems: List[str]) -> str:
    cls = type(first.module).__name__
    how = {ResolvedBy.HEURISTIC: "AutoTP heuristics", ResolvedBy.HF_PLAN: "the model's own Hugging Face TP plan",
           ResolvedBy.TP_PLAN: "tensor_parallel.tp_plan"}.get(first.resolved_by, f"{first.policy.source or 'policy'}")
    lines = "\n  - ".join(problems)
    return (f"AutoTP verification refused the plan for {cls} ({first.path}, from {how}):\n  - {lines}\n"
            f"  Write a Policy for {cls} with its roles (AttentionSpec with head counts, MLPSpec; see "
            f"docs/policies.md) and pass it as injection_policy={{{cls}: Policy(...)}} or from a plugin.")


# ----------------------------------------------------------------------------------------------- inputs
def _to_sample(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        return x.float() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_to_sample(v) for v in x)
    if isinstance(x, list):
        return [_to_sample(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_sample(v) for k, v in x.items()}
    return x


def _clean_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if ("cache" in k or "past" in k) and not isinstance(v, (bool, type(None))):
            v = None  # a KV cache would grow at every simulated run
        if k == "use_cache":
            v = False
        out[k] = v
    return out


def capture_inputs(model: nn.Module, samples: Sequence[nn.Module]) -> Dict[int, Tuple[tuple, dict]]:
    """``id(sample) -> (args, kwargs)`` of each sample layer, from one forward of ``model`` on a few tokens.

    Float tensors come back as float32 on the CPU. A sample the forward does not reach (or a model whose
    input cannot be guessed) is missing: its layer is then called with one hidden-state tensor.
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        return {}
    wanted = {id(m) for m in samples}
    got: Dict[int, Tuple[tuple, dict]] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(mod) in wanted and id(mod) not in got:
            got[id(mod)] = (_to_sample(args), _clean_kwargs(_to_sample(dict(kwargs))))
            if len(got) == len(wanted):
                raise _Captured()

    vocab = _vocab(model)
    if vocab is None:
        return {}
    ids = torch.randint(0, vocab, (1, _TOKENS), generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in samples]
    try:
        with torch.no_grad():
            for kwargs in ({"use_cache": False}, {}):
                try:
                    model(ids, **kwargs)
                    break
                except _Captured:
                    break
                except TypeError:
                    continue
                except Exception:  # noqa: BLE001 - an input the model does not take: fall back per layer
                    break
    finally:
        for h in handles:
            h.remove()
    return got


def _vocab(model: nn.Module) -> Optional[int]:
    fn = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(fn):
        try:
            emb = fn()
        except Exception:  # noqa: BLE001
            emb = None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def _sample_copy(layer: nn.Module, seed: int = 0) -> nn.Module:
    """A float32 CPU copy with fresh random weights (norm-like vectors near 1, matrices scaled by fan-in)."""
    sample = copy.deepcopy(layer)
    meta = [n for n, b in sample.named_buffers() if b.device.type == "meta"]
    if meta or any(p.device.type == "meta" for p in sample.parameters()):
        sample = sample.to_empty(device="cpu")  # a model created on the meta device: random weights, zero buffers
    sample = sample.to(device="cpu", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in sample.named_buffers():
            if name in meta:
                b.zero_()
        for name, p in sample.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] * max(1, p.dim() - 1)))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return sample


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for v in out:
            t = _first_tensor(v)
            if t is not None:
                return t
    for key in ("hidden_states", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return None


def _default_inputs(layer: nn.Module) -> Tuple[tuple, dict]:
    first = next((m for _, m in layer.named_modules() if is_linear_like(m)), None)
    hidden = shape_out_in(first)[1] if first is not None else 8
    x = torch.randn(1, _TOKENS, hidden, generator=torch.Generator().manual_seed(1))
    return (x,), _none_for_required(layer)


def _none_for_required(layer: nn.Module) -> Dict[str, Any]:
    """None for each required parameter of ``layer.forward`` after the hidden states (e.g. an encoder layer's
    ``attention_mask``), so a layer the model's forward does not reach can still be sampled unmasked."""
    try:
        params = list(inspect.signature(layer.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: None for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}


# ------------------------------------------------------------------------------------------ packed outputs
_SPLITS = {torch.chunk: "chunk", torch.Tensor.chunk: "chunk", torch.split: "split", torch.Tensor.split: "split",
           torch.tensor_split: "tensor_split", torch.Tensor.tensor_split: "tensor_split",
           torch.unbind: "unbind", torch.Tensor.unbind: "unbind"}


class _SplitWatch(TorchFunctionMode):
    """Records chunk / split of a linear's output along its last dimension: ``name -> (pieces, how)``."""

    def __init__(self, outputs: Dict[int, str]) -> None:
        super().__init__()
        self.outputs = outputs
        self.found: Dict[str, Tuple[int, str]] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = _SPLITS.get(func)
        if kind and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.outputs:
            t = args[0]
            default_dim = 0
            dim = kwargs.get("dim", args[2] if len(args) > 2 else default_dim)
            if kind == "unbind":
                dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int) and t.dim() and dim % t.dim() == t.dim() - 1 and isinstance(out, (tuple, list)):
                sizes = {int(o.shape[-1]) for o in out} if kind != "unbind" else {1}
                even = "equal" if len(sizes) == 1 else "unequal"
                self.found.setdefault(self.outputs[id(t)], (len(out), f"{kind} into {len(out)} {even} parts"))
        return out


def _reference(sample: nn.Module, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, Dict[str, Tuple[int, str]]]:
    """The unsharded output, and the linears whose output the forward splits along the features."""
    outputs: Dict[int, str] = {}
    keep: List[torch.Tensor] = []

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                outputs[id(out)] = name
                keep.append(out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in sample.named_modules() if n and is_linear_like(m)]
    watch = _SplitWatch(outputs)
    try:
        with torch.no_grad(), watch:
            out = _first_tensor(sample(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    if out is None:
        raise SimulationError("the forward returns no tensor")
    if not bool(torch.isfinite(out).all()):
        raise SimulationError("the unsharded output is not finite on random weights")
    return out.detach().clone(), watch.found


# ---------------------------------------------------------------------------------------------- checks
def verify_layer(layer: nn.Module, policy: Policy, model_config: Any, tp: int, grain: int,
                 inputs: Optional[Tuple[tuple, dict]] = None, path: str = "", correct: bool = False) -> LayerVerdict:
    """Check ``policy`` on one sample of ``layer`` (see the module docstring); ``correct``: fix packed linears.

    A plan that the split code itself refuses (a head count that does not divide, a grain that does not fit)
    is not reported here: the tensor-parallel pass reports it, with the real layer's numbers.
    """
    verdict = LayerVerdict(policy)
    sample = _sample_copy(layer)
    args, kwargs = inputs if inputs is not None else _default_inputs(sample)
    try:
        ref, packed = _reference(sample, args, kwargs)
    except Exception as exc:  # noqa: BLE001
        reason = f"the unsharded layer's forward fails on sample inputs: {type(exc).__name__}: {_short(exc)}"
        if inputs is None:  # made-up inputs: the layer may be fine, the plan is just unknown
            verdict.unverifiable = reason
        else:
            verdict.problems.append(f"{reason}, so the plan cannot be verified")
        return verdict
    try:
        planned = [LinearSplitter(tp, grain, r).plan_layer(sample, model_config, "", sample, policy, "verify")
                   for r in range(tp)]
    except PlanError:
        return verdict  # the pass reports it
    plans, heads = [p[0] for p in planned], planned[0][1]
    styles = {a.path: a.details.get("style") for a in plans[0] if "style" in a.details}
    for name, (pieces, how) in sorted(packed.items()):
        style = styles.get(name)
        if style != Style.COLUMN.value:
            continue
        if correct and pieces == 2 and "unequal" not in how:
            policy = attrs.evolve(policy, styles={**policy.styles, name: Style.PACKED_COLUMN})
            verdict.corrected.append(f"{name}: column -> packed_column (the forward does {how})")
        else:
            verdict.problems.append(f"{name}: the forward does {how} of its output, so it is a packed projection; a "
                                    f"plain column split gives every rank a wrong mix of the parts (a policy "
                                    f"would give it style 'packed_column' or a fused q/k/v AttentionSpec)")
    if verdict.corrected:
        verdict.policy = policy
        plans = [LinearSplitter(tp, grain, r).plan_layer(sample, model_config, "", sample, policy, "verify")[0]
                 for r in range(tp)]
    if verdict.problems:
        return verdict
    static = static_problems(sample, plans[0], heads)
    sim = SimulatedCollectives(tp)
    try:
        shards = [_build_rank(sample, plans[r], r, tp, sim) for r in range(tp)]
        outs = sim.run(shards, lambda m: _first_tensor(m(*args, **kwargs)))
    except Exception as exc:  # noqa: BLE001
        verdict.problems += static + [f"the simulated ranks' forward fails: {type(exc).__name__}: {_short(exc)}"
                                      + _attribute_hint(sample, plans[0])]
        return verdict
    verdict.collectives = sim.count
    for r, out in enumerate(outs):
        if out is None or tuple(out.shape) != tuple(ref.shape):
            verdict.problems += static + [f"rank {r}'s output has shape {None if out is None else tuple(out.shape)}, "
                                          f"the unsharded layer's {tuple(ref.shape)}" + _attribute_hint(sample, plans[0])]
            return verdict
        err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
        verdict.max_rel_err = max(verdict.max_rel_err, err) if err == err else float("nan")
        if not err <= RTOL:
            verdict.problems += static + [f"rank {r}'s output differs from the unsharded layer's (relative error "
                                          f"{err:.2e} > {RTOL:g})" + _attribute_hint(sample, plans[0])]
            return verdict
    return verdict


def _build_rank(sample: nn.Module, actions: list, rank: int, tp: int, sim: SimulatedCollectives) -> nn.Module:
    shard = copy.deepcopy(sample)
    source = ModuleSource(shard)
    info = TPInfo(rank=rank, world_size=tp, group=sim.rank(rank))
    built: Dict[str, nn.Module] = {}
    for a in actions:
        if isinstance(a.payload, AttrRewrite):
            apply_attributes(shard, a.payload)
        elif isinstance(a.payload, Shard):
            new = build_parallel(shard, a.path, a.payload, source, info, built)
            set_submodule(shard, a.path, new)
            built[a.path] = new
    return shard


def _split_sizes(actions: list) -> Tuple[Dict[int, str], set]:
    """(global size -> what splits it, the sizes kept whole) of one rank's linear actions."""
    split: Dict[int, str] = {}
    keep: set = set()
    for a in actions:
        if not isinstance(a.payload, Shard):
            if a.details.get("style") == "replicate" and "global" in a.details:
                keep.update(int(v) for v in a.details["global"])
            continue
        out_f, in_f = (int(v) for v in a.details["global"])
        if a.action in ("column", "column_gather", "vocab_head"):
            split.setdefault(out_f, f"the output features of {a.path}")
            keep.add(in_f)
        else:
            split.setdefault(in_f, f"the input features of {a.path}")
            keep.add(out_f)
    return split, keep


def static_problems(sample: nn.Module, actions: list, heads: Any = None) -> List[str]:
    """Parameters and buffers outside the split linears whose size the plan splits, but that it keeps whole.

    ``heads``: the layer's head geometry when the plan splits by heads (a per-head vector such as ``sinks``).
    """
    split, keep = _split_sizes(actions)
    if heads is not None and any("heads" in str(a.details.get("split", "")) for a in actions):
        split.setdefault(int(heads.heads), f"the {heads.heads} query heads")
        if heads.kv_heads != heads.heads and heads.kv_heads >= len(heads.shards):
            split.setdefault(int(heads.kv_heads), f"the {heads.kv_heads} key/value heads")
    split_paths = [a.path for a in actions if isinstance(a.payload, Shard)]
    sizes = {s: w for s, w in split.items() if s not in keep and s > 1}
    out: List[str] = []
    tensors = list(sample.named_parameters()) + list(sample.named_buffers())
    for name, t in tensors:
        owner = name.rpartition(".")[0]
        if any(owner == p for p in split_paths):
            continue
        for d, s in enumerate(t.shape):
            if int(s) in sizes:
                out.append(f"{name} (shape {tuple(t.shape)}): dimension {d} has the size {s} of "
                           f"{sizes[int(s)]}, which the plan splits over the ranks, but {name} is kept whole")
                break
    return out


def _attribute_hint(sample: nn.Module, actions: list) -> str:
    """Integer attributes that look like sizes the plan splits and that no rewrite covers."""
    split, keep = _split_sizes(actions)
    rewritten = {(a.path, k) for a in actions if isinstance(a.payload, AttrRewrite) for k in a.details}
    found = []
    for mpath, mod in sample.named_modules():
        if is_linear_like(mod):
            continue
        for k, v in vars(mod).items():
            if k.startswith("_") or not isinstance(v, int) or isinstance(v, bool) or (mpath, k) in rewritten:
                continue
            if v in split or (k in _HEAD_ATTRS and v > 1) or k.endswith(("head_dim", "embed_dim", "hidden_size")):
                found.append(f"{mpath + '.' if mpath else ''}{k}={v}")
    return ("; size attributes the plan keeps at their global value: " + ", ".join(found[:8])) if found else ""


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
