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

Expert slicing (``slice_group``, DeepSpeed's expert model parallelism): each local expert's intermediate
dimension is split over a group of ranks holding the same tokens (:func:`slice_experts`), and the partial
outputs are summed over it as well. With ``split_experts=False`` only the slicing applies: the
tensor-parallel sharding of the experts.

The local experts run on the block's backend: the fused Triton kernels and the PyTorch path both skip the
pairs marked ``-1`` (experts of other ranks).

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

__all__ = ["ExpertParallelMoE", "expert_range", "slice_experts"]


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


def slice_experts(moe: InjectedMoE, rank: int, size: int) -> None:
    """Keep this rank's share of every expert's intermediate dimension (expert slicing, DeepSpeed's
    expert model parallelism), in place: ``w13``'s gate rows and up rows column-split, ``w2`` row-split (its
    input features), ``b13`` with ``w13``, and ``b2`` kept on rank 0 only (zeros elsewhere: it is added
    once when the partial outputs are summed over the slicing group).

    Example:
        >>> m = InjectedMoE(torch.randn(4, 8), None, torch.randn(4, 12, 8), torch.randn(4, 8, 6), None, None,
        ...                 top_k=2, order="softmax_topk", normalize=True, weights_dtype="input",
        ...                 activation="silu", gated=True, backend="torch")
        >>> slice_experts(m, 1, 2)
        >>> tuple(m.w13.shape), tuple(m.w2.shape)
        ((4, 6, 8), (4, 8, 3))
    """
    if moe._quantized:
        raise PolicyError("expert slicing of quantized experts: slice first, then quantize")
    inter = moe.w2.shape[-1]
    if size < 1 or not 0 <= rank < size or inter % size:
        raise PolicyError(f"expert slicing: the experts' intermediate size {inter} cannot be split evenly over "
                          f"{size} ranks (rank {rank})")
    per = inter // size
    lo, hi = rank * per, (rank + 1) * per

    def rows(t: torch.Tensor) -> torch.Tensor:  # [E, (2)I, ...] -> this rank's rows of each half
        if not moe.gated:
            return t[:, lo:hi]
        return torch.cat([t[:, lo:hi], t[:, inter + lo:inter + hi]], dim=1)

    with torch.no_grad():
        moe.w13 = torch.nn.Parameter(rows(moe.w13.detach()).contiguous(), requires_grad=False)
        moe.w2 = torch.nn.Parameter(moe.w2.detach()[:, :, lo:hi].contiguous(), requires_grad=False)
        if moe.b13 is not None:
            moe.b13 = torch.nn.Parameter(rows(moe.b13.detach()).contiguous(), requires_grad=False)
        if moe.b2 is not None and rank != 0:
            moe.b2 = torch.nn.Parameter(torch.zeros_like(moe.b2), requires_grad=False)


class ExpertParallelMoE(torch.nn.Module):
    """An :class:`InjectedMoE` whose routed experts are split over ``group`` (see the module docstring).

    ``slice_group`` (optional): the ranks over which each local expert's intermediate dimension is split
    (:func:`slice_experts`; DeepSpeed's expert model-parallel group, ``moe.ep_mp_group``); its ranks must
    hold the same tokens (a tensor-parallel group). ``split_experts=False``: no expert parallelism, every
    rank holds every expert (sliced over ``slice_group``): the tensor-parallel sharding of the experts.
    """

    def __init__(self, moe: InjectedMoE, group: Any = None, tokens: str = "replicated", *,
                 slice_group: Any = None, split_experts: bool = True) -> None:
        super().__init__()
        import torch.distributed as dist

        if tokens not in ("replicated", "sharded"):
            raise ValueError(f"ExpertParallelMoE: tokens must be 'replicated' or 'sharded', got {tokens!r}")
        if moe._quantized:
            raise UnsupportedError("expert parallelism of quantized experts is not supported yet: shard first")
        self.group, self.tokens, self.split_experts = group, tokens, bool(split_experts)
        self.slice_group = slice_group
        if self.split_experts:
            self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        else:
            self.ep_size, self.ep_rank, self.tokens = 1, 0, "replicated"
        self.start, self.end = expert_range(moe.num_experts, self.ep_size, self.ep_rank)
        # local experts only: the replicated full tensors are replaced on the wrapped block
        if self.split_experts:
            for name in ("w13", "w2", "b13", "b2"):
                setattr(moe, name, _slice(getattr(moe, name), self.start, self.end))
        self.slice_size = 1 if slice_group is None else dist.get_world_size(slice_group)
        if self.slice_size > 1:
            slice_experts(moe, dist.get_rank(slice_group), self.slice_size)
        self.moe = moe

    @property
    def w13(self) -> Any:
        """This rank's ``w13`` (float, or :class:`~policyinject.kernels.moe.QuantizedExperts`)."""
        return self.moe.experts_weight("w13")

    @property
    def w2(self) -> Any:
        return self.moe.experts_weight("w2")

    def quantize_experts(self, num_bits: int = 8, group_size: Any = None, symmetric: bool = True) -> None:
        """Quantize this rank's experts (see :meth:`InjectedMoE.quantize_experts`)."""
        self.moe.quantize_experts(num_bits, group_size, symmetric)

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
        dispatch = m._dispatch(rows)
        if self.split_experts:
            local = (ids >= self.start) & (ids < self.end)
            ids = torch.where(local, ids - self.start, torch.full_like(ids, -1))
            if m.dispatch == "auto" and not torch.compiler.is_compiling():
                # PyTorch path: CUDA graphs are refused with expert parallelism, so run only the routed local
                # experts (one host read of the counts) rather than every local expert on every row
                dispatch = "grouped"
        backend = m.backend
        partial = moe_kernels.fused_moe(rows, m.experts_weight("w13"), m.experts_weight("w2"), ids, weights,
                                        m.activation, gated=m.gated, b13=m.b13, b2=m.b2, alpha=m.alpha,
                                        limit=m.limit, backend=backend, dispatch=dispatch)
        if self.slice_size > 1:
            dist.all_reduce(partial, group=self.slice_group)
        if self.split_experts:
            dist.all_reduce(partial, group=self.group)
        out = partial
        if self.tokens == "sharded":
            t = x.shape[0]
            out = partial[self.ep_rank * t:(self.ep_rank + 1) * t]
            weights = weights[self.ep_rank * t:(self.ep_rank + 1) * t]
        out = m.add_shared(x, out).reshape(shape)
        return (out, m.router_scores(weights, rows)) if m.returns_router_scores else out

    def extra_repr(self) -> str:
        sliced = f", each sliced over {self.slice_size} ranks" if self.slice_size > 1 else ""
        return f"experts [{self.start}, {self.end}) of {self.moe.num_experts}, ep {self.ep_rank}/{self.ep_size}, " \
               f"tokens={self.tokens}{sliced}"
