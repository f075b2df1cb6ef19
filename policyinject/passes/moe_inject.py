"""Kernel injection of mixture-of-experts blocks: how each rank holds the routed experts, then the module.

A layer whose policy has a :class:`~policyinject.policy.moe.MoESpec` matching its block (``Policy.moe_for``)
gets its MoE block replaced, in the MLP slot of the injected layer, by:

- :class:`~policyinject.modules.moe.InjectedMoE` (one process, or ``moe.ep_size`` 1 without tensor
  parallelism): every expert on this rank;
- :class:`~policyinject.modules.moe_parallel.ExpertParallelMoE` otherwise: the experts split over the
  expert-parallel group (``moe.ep_size``) and/or each expert's intermediate dimension sliced over the expert
  model-parallel group (the tensor-parallel group by default; ``moe.ep_mp_group`` when given).

Group layout (world ``W``, ``tensor_parallel.tp_size`` ``T``, ``moe.ep_size`` ``E``; TP groups are ``W / T``
replicas of consecutive ranks, :func:`policyinject.distributed.tp_group_ranks`), see :func:`expert_group_ranks`:

- ``E`` divides the number of replicas ``W / T`` (DeepSpeed's layout): an EP group joins the ranks of ``E``
  consecutive replicas with the same TP rank; tokens are gathered over it (each replica holds its own);
  each expert is sliced over the TP group;
- otherwise ``E`` divides ``T``: the EP group lies inside the TP group (tokens replicated), and each expert is
  sliced over the ``T / E`` ranks of the TP group holding the same experts;
- otherwise a :class:`~policyinject.errors.PlanError` naming ``moe.ep_size``.

Quantization (``dtype`` int8, ``quant.enabled``): the experts are quantized per expert after sharding, round
to nearest, with the bit width, symmetry and group size of ``quant.weight`` (group sizes fitted to this
rank's shard as for the linears).

Example:
    >>> expert_group_ranks(world=4, tp=2, ep=2)
    ExpertGroups(ep=[[0, 2], [1, 3]], slicing=[[0, 1], [2, 3]], tokens='sharded')
    >>> expert_group_ranks(world=2, tp=2, ep=2)
    ExpertGroups(ep=[[0, 1]], slicing=[], tokens='replicated')
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import attrs
import torch

from ..errors import PlanError, PolicyError

__all__ = ["ExpertGroups", "ExpertLayout", "ExpertQuant", "MoEBuild", "build_moe", "expert_group_ranks",
           "plan_moe", "resolve_expert_layout"]


@attrs.frozen
class ExpertGroups:
    """Global ranks of every EP group and every expert-slicing group; how tokens reach the EP group."""

    ep: List[List[int]]
    slicing: List[List[int]]
    tokens: str


def expert_group_ranks(world: int, tp: int, ep: int) -> ExpertGroups:
    """The default expert groups for ``world`` ranks, ``tp`` tensor-parallel and ``ep`` expert-parallel
    (see the module docstring). Raises ``PlanError`` naming ``moe.ep_size`` when no layout fits.

    Example:
        >>> expert_group_ranks(world=2, tp=1, ep=2).ep
        [[0, 1]]
        >>> expert_group_ranks(world=4, tp=4, ep=2)
        ExpertGroups(ep=[[0, 1], [2, 3]], slicing=[[0, 2], [1, 3]], tokens='replicated')
        >>> expert_group_ranks(world=9, tp=3, ep=2)
        Traceback (most recent call last):
        ...
        policyinject.errors.PlanError: moe.ep_size=2 fits neither the 3 data-parallel replicas (world 9 / tensor_parallel.tp_size 3) nor the tensor-parallel group of 3 ranks: it must divide one of them
    """
    if world % tp:
        raise PlanError(f"tensor_parallel.tp_size={tp} does not divide the world size {world}")
    replicas = world // tp
    tp_groups = [list(range(d * tp, (d + 1) * tp)) for d in range(replicas)]
    if replicas % ep == 0 and replicas > 1:
        eps = [[(b * ep + j) * tp + t for j in range(ep)] for b in range(replicas // ep) for t in range(tp)]
        return ExpertGroups(eps, tp_groups if tp > 1 else [], "sharded")
    if tp % ep == 0:
        eps = [[g[s * ep + j] for j in range(ep)] for g in tp_groups for s in range(tp // ep)]
        sl = [[g[s * ep + j] for s in range(tp // ep)] for g in tp_groups for j in range(ep)] if tp > ep else []
        return ExpertGroups(eps, sl, "replicated")
    raise PlanError(f"moe.ep_size={ep} fits neither the {replicas} data-parallel replicas (world {world} / "
                    f"tensor_parallel.tp_size {tp}) nor the tensor-parallel group of {tp} ranks: it must divide "
                    "one of them")


@attrs.frozen
class ExpertLayout:
    """How this rank holds the routed experts."""

    ep_size: int = 1
    slice_size: int = 1
    tokens: str = "replicated"
    ep_group: Any = attrs.field(default=None, eq=False, repr=False)
    slice_group: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def sharded(self) -> bool:
        return self.ep_size > 1 or self.slice_size > 1

    def describe(self) -> str:
        parts = []
        if self.ep_size > 1:
            parts.append(f"experts over {self.ep_size} EP ranks (tokens {self.tokens})")
        if self.slice_size > 1:
            parts.append(f"each expert sliced over {self.slice_size} ranks")
        return ", ".join(parts) or "every expert on every rank"


def _ranks(group: Any) -> List[int]:
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group))


def resolve_expert_layout(config: Any, tp_info: Any) -> ExpertLayout:
    """This rank's :class:`ExpertLayout` from the config and the tensor-parallel runtime (creating the
    default groups collectively: every rank must call it). ``PlanError`` names the keys of an impossible one."""
    import torch.distributed as dist

    moe = config.moe
    ep, tp = int(moe.ep_size), int(config.tensor_parallel.tp_size)
    tp_group = getattr(tp_info, "group", None) if tp > 1 else None
    if ep == 1 and moe.ep_group is None:
        group = moe.ep_mp_group if moe.ep_mp_group is not None else tp_group
        size = 1 if group is None else dist.get_world_size(group)
        return ExpertLayout(slice_size=size, slice_group=group if size > 1 else None)
    if not dist.is_available() or not dist.is_initialized():
        raise PlanError(f"moe.ep_size={ep} needs a process group: launch with `torchrun --nproc-per-node N ...` "
                        "(or initialise torch.distributed and pass moe.ep_group)")
    if moe.ep_group is not None:
        size = dist.get_world_size(moe.ep_group)
        if size != ep:
            raise PlanError(f"moe.ep_group has {size} ranks but moe.ep_size is {ep}")
        tokens = "replicated" if tp_group is not None and set(_ranks(moe.ep_group)) <= set(_ranks(tp_group)) \
            else "sharded"
        sl = moe.ep_mp_group
        ssize = 1 if sl is None else dist.get_world_size(sl)
        return ExpertLayout(ep, ssize, tokens, moe.ep_group, sl if ssize > 1 else None)
    groups = expert_group_ranks(dist.get_world_size(), tp, ep)
    me = dist.get_rank()
    mine_ep = mine_slice = None
    for ranks in groups.ep:  # every rank creates every group, in the same order
        g = dist.new_group(ranks)
        if me in ranks:
            mine_ep = g
    if moe.ep_mp_group is not None:
        mine_slice = moe.ep_mp_group
    elif groups.tokens == "sharded":
        mine_slice = tp_group  # across replicas, each expert is sliced over its TP group
    else:
        for ranks in groups.slicing:
            g = dist.new_group(ranks)
            if me in ranks:
                mine_slice = g
    ssize = 1 if mine_slice is None else dist.get_world_size(mine_slice)
    return ExpertLayout(ep, ssize, groups.tokens, mine_ep, mine_slice if ssize > 1 else None)


@attrs.frozen
class ExpertQuant:
    """Quantization of the routed experts (round to nearest, per expert)."""

    num_bits: int
    symmetric: bool
    groups: Dict[str, Optional[int]] = attrs.field(converter=dict)

    def describe(self) -> str:
        return (f"int{self.num_bits} {'sym' if self.symmetric else 'asym'} rtn, group w13 {self.groups['w13']}, "
                f"w2 {self.groups['w2']}")


@attrs.frozen
class MoEBuild:
    """Payload: what replaces one layer's MoE block."""

    spec: Any  # MoESpec
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    layout: ExpertLayout
    quant: Optional[ExpertQuant]
    backend: str

    @property
    def module_class(self) -> str:
        return "ExpertParallelMoE" if self.layout.sharded else "InjectedMoE"

    def describe(self) -> dict:
        out = {"block": self.spec.block_name, "replace": self.module_class, "experts": self.num_experts,
               "top_k": self.top_k, "layout": self.layout.describe()}
        if self.quant is not None:
            out["experts_quant"] = self.quant.describe()
        return out


def _expert_quant(ctx: Any, hidden: int, inter_local: int, where: str) -> Optional[ExpertQuant]:
    from .quantize import QuantizePass, plan_group_size, quant_spec_from_config, resolve_method

    if not QuantizePass.enabled(ctx.config):
        return None
    spec = quant_spec_from_config(ctx.config)
    method = resolve_method(spec.method, spec.num_bits, spec.symmetric)
    if spec.method != "auto" and method != "rtn":
        ctx.plan.warn(f"{where}: quant.weight.method {spec.method!r} applies to the linears; the routed experts "
                      "are quantized round to nearest")
    groups = {"w13": plan_group_size(spec, hidden, where=f"{where} experts w13"),
              "w2": plan_group_size(spec, inter_local, where=f"{where} experts w2")}
    return ExpertQuant(spec.num_bits, spec.symmetric, groups)


def plan_moe(ctx: Any, path: str, layer: torch.nn.Module, policy: Any, layout: ExpertLayout,
             backend: str) -> Optional[MoEBuild]:
    """The :class:`MoEBuild` of one layer (None: no MoE block of the policy there, or ``moe.enabled`` off)."""
    spec = policy.moe_for(layer)
    if spec is None or not ctx.config.moe.enabled:
        return None
    from ..modules.moe import _expert_weights, _get

    where = f"{path}.{spec.module} ({spec.block_name})"
    block = layer.get_submodule(spec.module) if spec.module else layer
    try:
        resolved = spec.router.resolve(ctx.model_config)
        experts = _get(block, spec.experts.module, f"ExpertsSpec({spec.experts.module!r})")
        w13, w2, _, _ = _expert_weights(experts, spec.experts, resolved.num_experts)
    except PolicyError as exc:
        raise PlanError(f"{where}: {exc}") from None
    num, hidden, inter = int(w2.shape[0]), int(w2.shape[1]), int(w2.shape[2])
    problems = []
    given = tuple(ctx.config.moe.moe_experts)
    if given != (1,) and num not in given:
        problems.append(f"{where}: moe.moe_experts {list(given)} does not include the model's {num} experts")
    if num % layout.ep_size:
        problems.append(f"{where}: {num} experts cannot be split evenly over moe.ep_size={layout.ep_size}")
    if inter % layout.slice_size:
        key = "moe.ep_mp_group" if ctx.config.moe.ep_mp_group is not None else "tensor_parallel.tp_size"
        problems.append(f"{where}: the experts' intermediate size {inter} cannot be sliced evenly over the "
                        f"{layout.slice_size} ranks of {key}")
    if problems:
        raise PlanError(problems)
    quant = _expert_quant(ctx, hidden, inter // layout.slice_size, where)
    return MoEBuild(spec, num, resolved.top_k, hidden, inter, layout, quant, backend)


def build_moe(build: MoEBuild, block: torch.nn.Module, model_config: Any) -> torch.nn.Module:
    """The module replacing ``block`` (the layer's HF MoE block) as ``build`` says."""
    from ..modules.moe import InjectedMoE
    from ..modules.moe_parallel import ExpertParallelMoE

    module: Any = InjectedMoE.build(block, build.spec, model_config, backend=build.backend)
    lay = build.layout
    if lay.sharded:
        module = ExpertParallelMoE(module, lay.ep_group, lay.tokens, slice_group=lay.slice_group,
                                   split_experts=lay.ep_size > 1)
    if build.quant is not None:
        q = build.quant
        module.quantize_experts(q.num_bits, dict(q.groups), q.symmetric)
    if lay.sharded or build.quant is not None:
        _release_experts(block, build.spec)
    return module


def _release_experts(block: torch.nn.Module, spec: Any) -> None:
    """Drop the replaced block's float expert weights once the new module holds its own (a shard or quantized
    copy), so the full set and the new one are not both alive until the pipeline ends (the block is discarded:
    its forward is never called again)."""
    experts = block.get_submodule(spec.experts.module) if spec.experts.module else block
    for mod in experts.modules():
        for name in list(mod._parameters):
            mod._parameters[name] = None
