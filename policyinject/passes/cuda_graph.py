"""The ``cuda_graph`` pass: generation through the decode engine, with every decode step replayed from a
CUDA graph.

Asked for by ``enable_cuda_graph=True``. Unlike DeepSpeed (one graph of one forward, captured on the first
call, bypassed by ``generate``), it records the engine's decoder in the plan (``plan.decode``, a
:class:`~policyinject.plan_fields.DecodeDescription` with ``use_graphs=True``), from which the engine builds: a
static KV cache sized from ``max_out_tokens`` and ``max_batch_size``, an eager prefill, and decode steps
captured per signature (batch size, attended cache span, greedy or sampling), at most
``cuda_graph_cache_size`` graphs, least recently used evicted. See docs/decode.md.

Planning checks, before anything is touched:

- CUDA is available (else :class:`~policyinject.errors.UnsupportedError` naming ``enable_cuda_graph`` and
  the torch build) and the model goes to a CUDA device;
- with ``tensor_parallel.tp_size`` > 1, the group's all-reduces can be captured: NCCL on a CUDA device
  (:func:`tp_capture_problem`; a gloo / CPU group is refused with the reason). The captured decode step then
  holds each layer's all-reduces, replayed like every other kernel;
- ``replace_with_kernel_inject`` is on and every decoder layer is covered by a policy with a block wiring
  (the decode path runs ``InjectedBlock.run``);
- the model-level policy gives what the decode path needs (layers, embed, lm_head, rotary module).

Example:
    >>> from policyinject.config import load_config
    >>> CudaGraphPass.name, CudaGraphPass.enabled(load_config(None))
    ('cuda_graph', False)
"""

from __future__ import annotations

from typing import Any, List

import torch

from ..decode.graphs import require_cuda
from ..decode.runner import decode_problems
from ..distributed import default_backend
from ..errors import PlanError, UnsupportedError
from ..plan import Action
from ..modules.block import effective_block_kind
from ..policy.model import BlockKind
from .base import Pass, PassContext
from .kernel_inject import decode_description

__all__ = ["CudaGraphPass", "plan_problems", "tp_backend", "tp_capture_problem"]


def plan_problems(ctx: PassContext) -> List[str]:
    """Why the decode engine could not run this model under this config (empty: it can). No CUDA check.

    Example:
        >>> from policyinject.config import load_config
        >>> from policyinject.testing.presets import tiny_model
        >>> from policyinject.passes.base import PassContext
        >>> ctx = PassContext(model=tiny_model("llama"), config=load_config(None))
        >>> plan_problems(ctx)[0]
        '`enable_cuda_graph` needs `replace_with_kernel_inject` = True: the decode graphs run the injected blocks'
    """
    cfg = ctx.config
    problems: List[str] = []
    tp_problem = tp_capture_problem(ctx)
    if tp_problem:
        problems.append(tp_problem)
    if not cfg.replace_with_kernel_inject:
        problems.append("`enable_cuda_graph` needs `replace_with_kernel_inject` = True: the decode graphs run the "
                        "injected blocks")
        return problems
    problems.extend(decode_problems(ctx.model, ctx.model_policy, ctx.model_config, require_injected=False))
    if problems or ctx.model_policy is None:
        return problems
    layers = ctx.model.get_submodule(ctx.model_policy.layers)
    prefix = ctx.model_policy.layers
    by_path = {m.path: m for m in ctx.layers}
    for i, layer in enumerate(layers):
        path = f"{prefix}.{i}" if prefix else str(i)
        matched = by_path.get(path)
        if matched is None:
            problems.append(f"{path}: no policy covers {type(layer).__name__}; the decode engine needs every decoder "
                            "layer injected")
            continue
        kind = effective_block_kind(matched.policy, matched.module)
        if kind is BlockKind.OPAQUE:
            problems.append(f"{path}: the policy for {type(layer).__name__} ({matched.policy.source or 'unnamed'}) "
                            "is `opaque`, so the layer keeps its own forward; the decode engine needs a block "
                            "wiring (pre_norm, parallel or post_norm)")
        elif matched.policy.mlp is None and (matched.policy.moe_for(matched.module) is None or not cfg.moe.enabled):
            why = "`moe.enabled` is false" if matched.policy.moe_for(matched.module) is not None else \
                "the policy names no MLP for it"
            problems.append(f"{path}: {type(layer).__name__} keeps its own MLP slot ({why}), so it stays a "
                            "submodule-level injection; the decode engine needs a whole injected block")
        elif matched.policy.attention is not None and not matched.policy.attention.causal:
            problems.append(f"{path}: {type(layer).__name__} has bidirectional attention; generation needs a "
                            "causal decoder")
    return problems


def tp_backend(ctx: PassContext) -> str:
    """The backend of this rank's tensor-parallel group: the group's own, or -- when only planning (no group
    yet) -- the one ``init_inference`` would create for the target device (NCCL on CUDA, gloo otherwise)."""
    info = ctx.tp
    if info is not None and not info.planning_only and info.backend:
        return str(info.backend)
    return default_backend(ctx.device)


def tp_capture_problem(ctx: PassContext) -> str:
    """Why the decode graphs could not capture this config's tensor-parallel all-reduces ("" if they can).

    Collectives can be captured into a CUDA graph only when they are NCCL kernels on the capturing stream: a
    gloo all-reduce runs on the host, outside any graph. DeepSpeed rejects ``enable_cuda_graph`` with
    ``tp_size > 1`` outright; policyinject refuses it only there, at plan time (the backend is known only
    once the group exists), before the model is changed.

    Example:
        >>> import torch
        >>> from policyinject.config import load_config
        >>> from policyinject.passes.base import PassContext
        >>> ctx = PassContext(model=torch.nn.Linear(2, 2), device=torch.device("cpu"),
        ...                   config=load_config(None, enable_cuda_graph=True, tp={"tp_size": 2}))
        >>> tp_capture_problem(ctx).split(":")[0]
        '`enable_cuda_graph` with `tensor_parallel.tp_size` = 2 needs NCCL on CUDA'
    """
    tp = ctx.config.tensor_parallel.tp_size
    if tp <= 1:
        return ""
    backend = tp_backend(ctx)
    on_cuda = ctx.device is not None and torch.device(ctx.device).type == "cuda"
    if "nccl" in backend.lower() and on_cuda:
        return ""
    where = f"backend {backend!r} on {ctx.device}"
    return (f"`enable_cuda_graph` with `tensor_parallel.tp_size` = {tp} needs NCCL on CUDA: this group's "
            f"all-reduces run on {where}, and only NCCL collectives on a CUDA stream can be captured in a CUDA "
            "graph. Use NCCL on GPUs, or set enable_cuda_graph=False (the same decode steps run eagerly)")


class CudaGraphPass(Pass):
    """Install the graph-replaying decoder; see the module docstring."""

    name = "cuda_graph"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """``enable_cuda_graph``."""
        return bool(config.enable_cuda_graph)

    def plan(self, ctx: PassContext) -> list:
        tp_problem = tp_capture_problem(ctx)
        if tp_problem:  # before the CUDA check: on a gloo group, the backend is the reason
            raise PlanError([tp_problem])
        require_cuda("`enable_cuda_graph` = True")
        if ctx.device is not None and torch.device(ctx.device).type != "cuda":
            raise UnsupportedError(f"`enable_cuda_graph` = True needs the model on a CUDA device; it goes to "
                                   f"{ctx.device} (is `keep_module_on_host` set?)")
        problems = plan_problems(ctx)
        if problems:
            raise PlanError(problems)
        cfg = ctx.config
        details = {
            "max_out_tokens": cfg.max_out_tokens,
            "max_batch_size": cfg.max_batch_size or "first call",
            "cuda_graph_cache_size": cfg.cuda_graph_cache_size,
            "prefill": "eager",
            "decode": "graph per (batch, span)",
        }
        return [Action(self.name, "", type(ctx.model).__name__, "decode graphs", details)]

    def apply(self, ctx: PassContext, actions: list) -> None:
        problems = decode_problems(ctx.model, ctx.model_policy, ctx.model_config)
        if problems:
            raise UnsupportedError("the decode engine cannot run the transformed model:\n  " + "\n  ".join(problems))
        ctx.plan.decode = decode_description(ctx.config, use_graphs=True, when_unsupported="raise")
