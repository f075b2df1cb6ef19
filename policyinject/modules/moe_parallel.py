"""Expert parallelism: the experts of an :class:`~policyinject.modules.moe.InjectedMoE` partitioned over the
ranks of an expert-parallel (EP) group, tokens dispatched to every rank and the partial outputs combined.

Scheme (all-gather + all-reduce, no data-dependent message sizes, so it is CUDA-graph friendly):

1. ``tokens="sharded"`` (each EP rank holds its own ``T`` tokens, the data-parallel layout): the ranks'
   tokens are all-gathered (``ep * T`` rows; every rank must hold the same ``T``). ``tokens="replicated"``
   (every rank holds the same tokens, e.g. after tensor-parallel attention): nothing to gather.
2. Every rank routes all rows with the full, replicated router (identical results everywhere) and runs only
   its own experts ``[rank * E/ep, (rank + 1) * E/ep)``; pairs routed elsewhere are marked out of range and
   contribute nothing.
3. The partial outputs are summed over the group (all-reduce); a ``sharded`` rank keeps its own rows. The
   shared expert (Qwen2-MoE) is replicated and runs on the rank's own tokens only.

An all-to-all dispatch (send each pair only to its expert's rank) moves less data at large batch but needs
per-step sizes on the host; the choice between them is a measurement for multi-GPU runs.

The local experts run on the PyTorch path (:func:`policyinject.kernels.moe.moe_reference`): the Triton kernels
do not take out-of-range expert ids yet, so ``backend="triton"`` is refused.

Example:
    >>> expert_range(num_experts=8, ep_size=4, ep_rank=1)
    (2, 4)
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from ..errors import PolicyError, UnsupportedError
from ..kernels import moe as moe_kernels
from .moe import InjectedMoE

__all__ = ["ExpertParallelMoE", "expert_range"]


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> Tuple[int, int]:
    """``[start, end)`` of the experts rank ``ep_rank`` of ``ep_size`` holds (contiguous, equal blocks).

    Example:
        >>> expert_range(6, 4, 0)
        Traceback (most recent call last):
        ...
        policyinject.errors.PolicyError: 6 experts cannot be split evenly over ep_size 4
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise PolicyError(f"expert parallelism: rank {ep_rank} is not in an EP group of size {ep_size}")
    if num_experts % ep_size:
        raise PolicyError(f"{num_experts} experts cannot be split evenly over ep_size {ep_size}")
    per = num_experts // ep_size
    return ep_rank * per, (ep_rank + 1) * per


def _slice(t: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    return None if t is None else torch.nn.Parameter(t.detach()[start:end].clone(), requires_grad=False)


class ExpertParallelMoE(torch.nn.Module):
    """An :class:`InjectedMoE` whose routed experts are split over ``group`` (see the module docstring)."""

    def __init__(self, moe: InjectedMoE, group: Any = None, tokens: str = "replicated") -> None:
        super().__init__()
        import torch.distributed as dist

        if tokens not in ("replicated", "sharded"):
            raise ValueError(f"ExpertParallelMoE: tokens must be 'replicated' or 'sharded', got {tokens!r}")
        if moe.backend == "triton":
            raise UnsupportedError("expert parallelism runs the local experts on the PyTorch path; "
                                   "backend='triton' is not supported yet")
        if moe._quantized:
            raise UnsupportedError("expert parallelism of quantized experts is not supported yet: shard first")
        self.group, self.tokens = group, tokens
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.start, self.end = expert_range(moe.num_experts, self.ep_size, self.ep_rank)
        self.moe = moe
        # local experts only: the replicated full tensors are dropped from this module
        self.w13, self.w2 = _slice(moe.w13, self.start, self.end), _slice(moe.w2, self.start, self.end)
        self.b13, self.b2 = _slice(moe.b13, self.start, self.end), _slice(moe.b2, self.start, self.end)
        for name in ("w13", "w2", "b13", "b2"):
            setattr(moe, name, None)

    def forward(self, hidden_states: torch.Tensor) -> Any:
        import torch.distributed as dist

        m = self.moe
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        rows = x
        if self.tokens == "sharded":
            parts = [torch.empty_like(x) for _ in range(self.ep_size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            rows = torch.cat(parts)
        _, weights, ids = m.route(rows)
        local = (ids >= self.start) & (ids < self.end)
        local_ids = torch.where(local, ids - self.start, torch.full_like(ids, -1))
        partial = moe_kernels.fused_moe(rows, self.w13, self.w2, local_ids, weights, m.activation, gated=m.gated,
                                        b13=self.b13, b2=self.b2, alpha=m.alpha, limit=m.limit, backend="torch",
                                        dispatch=m._dispatch(rows))
        dist.all_reduce(partial, group=self.group)
        out = partial
        if self.tokens == "sharded":
            t = x.shape[0]
            out = partial[self.ep_rank * t:(self.ep_rank + 1) * t]
            weights = weights[self.ep_rank * t:(self.ep_rank + 1) * t]
        if m.shared is not None:
            s = m.shared(x)
            if m.shared_gate is not None:
                s = torch.sigmoid(m.shared_gate(x)) * s
            out = out + s
        out = out.reshape(shape)
        return (out, weights) if m.returns_router_scores else out

    def extra_repr(self) -> str:
        return f"experts [{self.start}, {self.end}) of {self.moe.num_experts}, ep {self.ep_rank}/{self.ep_size}, " \
               f"tokens={self.tokens}"
