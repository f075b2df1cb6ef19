"""The tensor-parallel pass: split every covered layer's linears over ``tp_size`` ranks, Megatron style.

**Plan** (nothing mutated): for each resolved layer (policies from the user, plugins, HF plans or the AutoTP
heuristics, all resolved before any pass: :mod:`policyinject.policy.resolve`), every linear gets an action
with its style, its global and local ``[out, in]`` shape and which rows/columns this rank keeps
(:mod:`~policyinject.passes.tp_linears`); attention head counts are split by whole KV groups
(:mod:`~policyinject.passes.tp_heads`) and MLP/vocabulary dimensions by ``tp_grain_size``. Attributes the
layer's own forward reads are rewritten per rank (:mod:`~policyinject.passes.tp_attributes`). The model-level
embedding and output head are vocabulary-parallel (:mod:`~policyinject.passes.tp_model_level`). The pass
records a :class:`~policyinject.plan_fields.TensorParallelLayout` in the plan: this rank's heads per layer and
the local shape of every split linear, which the quantize and kernel-injection passes read.

**Apply**: each action builds a parallel module from its slices and swaps it in
(:mod:`~policyinject.passes.tp_apply`). Slices come from the in-memory module, or -- for a model created on the
meta device with ``checkpoint=`` a safetensors directory -- straight from the files, each rank reading only
its own slices (:mod:`policyinject.checkpoint`).

Example (planning only; no process group is needed to plan):
    >>> import torch
    >>> from policyinject.config import load_config
    >>> from policyinject.passes.base import PassContext, ResolvedLayer
    >>> from policyinject.policy import Policy
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc1 = torch.nn.Linear(8, 32); self.fc2 = torch.nn.Linear(32, 8)
    ...     def forward(self, x):
    ...         return self.fc2(self.fc1(x))
    >>> model = torch.nn.Sequential(Block())
    >>> cfg = load_config(None, tensor_parallel={"tp_size": 2, "tp_grain_size": 8})
    >>> ctx = PassContext(model=model, config=cfg,
    ...                   layers=[ResolvedLayer("0", model[0], Policy(Block, styles={"fc2": "row"}, default_style="column"))])
    >>> [(a.path, a.action, a.details.get("local")) for a in TensorParallelPass().plan(ctx)]
    [('0.fc1', 'column', [16, 8]), ('0.fc2', 'row', [8, 16]), ('', 'lint', None)]
    >>> ctx.plan.tensor_parallel.local_shapes
    {'0.fc1': (16, 8), '0.fc2': (8, 16)}
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from .. import checkpoint as ckpt
from .._nn import set_submodule
from ..distributed import TPInfo, resolve_tp
from ..errors import PlanError, UnsupportedError
from ..plan import Action
from ..rank_agreement import agree
from ..plan_fields import LocalHeads, TensorParallelLayout
from .base import Pass, PassContext, owner_of
from .quantize import quantize_action
from .tp_apply import build_parallel, shard_tensors
from .tp_attributes import AttrRewrite, apply_attributes
from .tp_linears import LinearSplitter, Shard
from .tp_model_level import plan_model_level
from .tp_verify import verify_layers

__all__ = ["TensorParallelPass"]

NAME = "tensor_parallel"


class TensorParallelPass(Pass):
    """Shard covered layers over the tensor-parallel group (see the module docstring)."""

    name = NAME

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """``tensor_parallel.tp_size`` > 1, or a ``checkpoint`` to load (read through this pass's sources)."""
        return config.tensor_parallel.tp_size > 1 or bool(config.checkpoint)

    # ------------------------------------------------------------------------------------------- plan
    def plan(self, ctx: PassContext) -> List[Action]:
        tpc = ctx.config.tensor_parallel
        tp = int(tpc.tp_size)
        if not isinstance(ctx.tp, TPInfo):
            ctx.tp = resolve_tp(tp, tp_group=tpc.tp_group, mpu=tpc.mpu, device=ctx.device,
                                timeout_s=tpc.setup_timeout_s)
            agree(ctx.tp, ctx.model, ctx.config)  # every rank here, same config and model, before any change
        info = ctx.tp
        splitter = LinearSplitter(tp, int(tpc.tp_grain_size or 1), info.rank)
        layout = TensorParallelLayout(tp_size=tp, rank=info.rank, grain=splitter.grain)
        # guessed plans (AutoTP, HF plans, short forms) are proved on one process first (PlanError if wrong)
        unverified: List[tuple] = []
        ctx.layers[:] = verify_layers(ctx.model, ctx.model_config, ctx.layers, tp, splitter.grain, unverified)
        problems: List[str] = []
        layer_actions: List[Action] = [Action(NAME, path, type(ctx.module(path)).__name__, "lint",
                                              {"problem": reason, "source": "AutoTP verification"})
                                       for path, reason in unverified]
        for layer in ctx.layers:
            how = layer.resolved_by.value if layer.resolved_by.is_autotp else "policy"
            try:
                actions, heads = splitter.plan_layer(ctx.model, ctx.model_config, layer.path, layer.module,
                                                     layer.policy, how)
            except PlanError as exc:
                problems.extend(exc.problems)
                continue
            if heads is not None:
                layout.heads[layer.path] = LocalHeads(heads.mine.num_heads, heads.mine.num_kv_heads)
            layer_actions += actions
        embed, head = plan_model_level(ctx.model, ctx.model_policy, ctx.autotp_model_policy, splitter, problems)
        if problems:
            raise PlanError(problems)
        actions = embed + layer_actions + head
        for a in actions:
            if isinstance(a.payload, Shard) and "local" in a.details:
                layout.local_shapes[a.path] = (int(a.details["local"][0]), int(a.details["local"][1]))
        ctx.plan.tensor_parallel = layout
        load = ckpt.plan_checkpoint(ctx, tp, [a.payload for a in actions if isinstance(a.payload, Shard)])
        if load is not None:
            actions.append(load)
        return actions

    # ------------------------------------------------------------------------------------------ apply
    def check_can_apply(self, ctx: PassContext) -> None:
        """Raise before any pass applies when this one cannot (planned without a process group)."""
        info: TPInfo = ctx.tp
        if info is None or (info.planning_only and info.world_size > 1):
            raise UnsupportedError(
                f"tensor_parallel.tp_size={info.world_size if info else '?'} was planned without a process group; "
                f"launch with `torchrun --nproc-per-node {info.world_size if info else 'N'} ...` or pass "
                f"tensor_parallel.tp_group")

    def apply(self, ctx: PassContext, actions: List[Action]) -> None:
        self.check_can_apply(ctx)
        info: TPInfo = ctx.tp
        load_action = next((a for a in actions if a.action == "load_checkpoint"), None)
        source, meter = ckpt.open_source(ctx, load_action)
        saved: Dict[str, torch.Tensor] = {}
        built: Dict[str, nn.Module] = {}
        layer_paths = [m.path for m in ctx.layers]
        pending: List[tuple] = []  # (path, shard, new) of the layer being built

        save_path = ctx.config.save_mp_checkpoint_path

        def swap_in() -> None:  # the whole layer is built: swap its modules in, release the originals
            if save_path:
                for _, shard, new in pending:
                    saved.update(shard_tensors(shard, new))
            for path, shard, new in pending:
                set_submodule(ctx.model, path, new)
                built[path] = new
                release = getattr(source, "release", None)
                if release is not None:
                    release(shard.weight.name, shard.bias.name if shard.bias else None)
            pending.clear()

        with meter:
            for a in actions:
                if isinstance(a.payload, AttrRewrite):
                    swap_in()
                    apply_attributes(ctx.model, a.payload)
                    continue
                if not isinstance(a.payload, Shard):  # replicate, lint, load_checkpoint: nothing to build
                    continue
                owner = owner_of(a.path, layer_paths)
                if pending and ctx.building != owner:
                    swap_in()
                ctx.building = owner
                shard: Shard = a.payload
                new = build_parallel(ctx.model, a.path, shard, source, info, {**built, **{p: n for p, _, n in pending}})
                on_load = ctx.quantize_on_load.get(a.path)
                if on_load is not None:  # quantized as read: one linear of 16-bit weights alive at a time
                    new = quantize_action(a.path, new, on_load)
                pending.append((a.path, shard, new))
            swap_in()
            ctx.building = "(tensors outside the parallel modules)"
            ckpt.materialize_rest(ctx, source, built)
            ctx.building = None
        if meter.report and ctx.plan.tensor_parallel is not None:
            ctx.plan.tensor_parallel.load = dict(meter.report)
        if save_path:
            ckpt.save_sharded(ctx, save_path, saved, built)
