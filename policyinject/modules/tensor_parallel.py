"""Tensor-parallel modules: column/row-parallel linears, vocabulary-parallel embedding and output head.

Each parallel linear wraps an inner ``local`` linear-like module holding this rank's shard (an
``nn.Linear`` after sharding; a quantized linear after the quantize pass replaces ``.local``) and adds only
the communication. ``.weight``/``.bias`` are the LOCAL shard, ``in_features``/``out_features`` the local
sizes, and the process group handle lives on the instance (nothing is process-global). With
``world_size == 1`` (or ``group=None`` and no process group) the modules skip communication, which keeps
them usable in single-process tests.

Example (one process, so no communication happens):
    >>> import torch
    >>> full = torch.nn.Linear(4, 6)
    >>> col = ColumnParallelLinear.from_linear(full, rows=range(0, 3))
    >>> col.out_features, col.weight.shape
    (3, torch.Size([3, 4]))
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(col(x), full(x)[:, :3])
    True
    >>> qk = ColumnParallelLinear.cat([col, ColumnParallelLinear.from_linear(full, rows=range(3, 6))])
    >>> torch.allclose(qk(x), full(x))
    True
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _world(group: Any) -> int:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group: Any, world_size: int) -> torch.Tensor:
    """Sum ``x`` over the group (in place on a contiguous copy); a no-op for one rank.

    A simulated group (:class:`policyinject.passes.tp_simulate.SimulatedRank`, used to verify plans on one
    process) answers itself.
    """
    if world_size == 1:
        return x
    simulated = getattr(group, "simulated_all_reduce", None)
    if simulated is not None:
        return simulated(x)
    import torch.distributed as dist

    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def gather_last_dim(x: torch.Tensor, sizes: Sequence[int], group: Any, world_size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension; shards may have different sizes."""
    if world_size == 1:
        return x
    simulated = getattr(group, "simulated_all_gather", None)
    if simulated is not None:
        return simulated(x, sizes)
    import torch.distributed as dist

    width = max(sizes)
    local = x.contiguous()
    if local.shape[-1] < width:
        local = F.pad(local, (0, width - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local, group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def _index(rows: Any, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device=device, dtype=torch.long)
    return torch.as_tensor(list(rows), dtype=torch.long, device=device)


def _new_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` that owns ``weight`` (``[out, in]``) and ``bias`` without allocating anything else."""
    lin = nn.Linear(1, 1, bias=False, device="meta")
    lin.in_features, lin.out_features = int(weight.shape[1]), int(weight.shape[0])
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    else:
        lin.register_parameter("bias", None)
    return lin


def cat_locals(locals_: Sequence[nn.Module]) -> nn.Module:
    """Concatenate output features of linear-like modules of one type (``nn.Linear`` or one with ``cat``)."""
    first = locals_[0]
    if any(type(m) is not type(first) for m in locals_):
        raise TypeError("cannot concatenate linears of different types: " + ", ".join(type(m).__name__ for m in locals_))
    if hasattr(type(first), "cat") and not isinstance(first, nn.Linear):
        return type(first).cat(list(locals_))
    weight = torch.cat([m.weight for m in locals_], dim=0)
    has_bias = [m.bias is not None for m in locals_]
    if any(has_bias) and not all(has_bias):
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=weight.dtype, device=weight.device)
                  for m in locals_]
    else:
        biases = [m.bias for m in locals_] if all(has_bias) else None
    bias = torch.cat(biases) if biases else None
    return _new_linear(weight.detach(), None if bias is None else bias.detach())


class _ParallelBase(nn.Module):
    """Common state: the group handle, this rank and the world size, stored on the instance."""

    def __init__(self, group: Any = None, rank: int = 0, world_size: Optional[int] = None) -> None:
        super().__init__()
        self.group = group
        self.rank = int(rank)
        self.world_size = int(world_size) if world_size is not None else _world(group)


class _LocalLinear(_ParallelBase):
    """A parallel linear that wraps this rank's ``local`` linear-like module and adds only communication."""

    @property
    def weight(self) -> torch.Tensor:
        return self.local.weight

    @property
    def in_features(self) -> int:
        return int(self.local.in_features)

    @property
    def out_features(self) -> int:
        return int(self.local.out_features)


class ColumnParallelLinear(_LocalLinear):
    """Output features split over ranks; no communication unless ``gather_output`` (then an all-gather).

    ``out_sizes`` lists every rank's output-feature count (needed only to gather uneven shards).
    """

    def __init__(self, local: nn.Module, *, group: Any = None, rank: int = 0, world_size: Optional[int] = None,
                 gather_output: bool = False, out_sizes: Optional[Sequence[int]] = None,
                 global_in_features: Optional[int] = None, global_out_features: Optional[int] = None) -> None:
        super().__init__(group, rank, world_size)
        self.local = local
        self.gather_output = bool(gather_output)
        self.out_sizes: List[int] = list(out_sizes) if out_sizes is not None else [local.out_features] * self.world_size
        self.global_in_features = int(global_in_features or local.in_features)
        self.global_out_features = int(global_out_features or sum(self.out_sizes))

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.local, "bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, rows: Any, *, transposed: bool = False, **kwargs: Any) -> "ColumnParallelLinear":
        """Shard an ``nn.Linear`` (or a transposed ``Conv1D`` with ``transposed=True``) by output rows."""
        weight = linear.weight.t() if transposed else linear.weight
        idx = _index(rows, weight.device)
        w = weight.detach().index_select(0, idx).contiguous()
        b = linear.bias.detach().index_select(0, idx).contiguous() if getattr(linear, "bias", None) is not None else None
        kwargs.setdefault("global_in_features", weight.shape[1])
        kwargs.setdefault("global_out_features", weight.shape[0])
        return cls(_new_linear(w, b), **kwargs)

    @classmethod
    def cat(cls, modules: Sequence["ColumnParallelLinear"]) -> "ColumnParallelLinear":
        """Concatenate the output features of several column-parallel linears of one group (q|k|v, gate|up)."""
        first = modules[0]
        if any(m.gather_output for m in modules):
            raise ValueError("cannot fuse column-parallel linears that gather their output")
        if any(m.group is not first.group or m.world_size != first.world_size for m in modules):
            raise ValueError("cannot fuse column-parallel linears of different process groups")
        local = cat_locals([m.local for m in modules])
        sizes = [sum(m.out_sizes[r] for m in modules) for r in range(first.world_size)]
        return cls(local, group=first.group, rank=first.rank, world_size=first.world_size, out_sizes=sizes,
                   global_in_features=first.global_in_features,
                   global_out_features=sum(m.global_out_features for m in modules))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if self.gather_output:
            y = gather_last_dim(y, self.out_sizes, self.group, self.world_size)
        return y

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, out={self.out_features} of {self.global_out_features}"
                f"{', gather_output' if self.gather_output else ''}")


class RowParallelLinear(_LocalLinear):
    """Input features split over ranks; all-reduce after the matmul; the bias is added once, after the reduce.

    With ``split_input`` the input arrives replicated and this rank slices its ``in_start:in_start+in``
    columns first (HF ``rowwise_split_input``).
    """

    def __init__(self, local: nn.Module, bias: Optional[torch.Tensor] = None, *, group: Any = None, rank: int = 0,
                 world_size: Optional[int] = None, split_input: bool = False, in_start: int = 0,
                 global_in_features: Optional[int] = None) -> None:
        super().__init__(group, rank, world_size)
        if getattr(local, "bias", None) is not None:
            raise ValueError("the local linear of a RowParallelLinear must have no bias (it is added after the reduce)")
        self.local = local
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self.split_input = bool(split_input)
        self.in_start = int(in_start)
        self.global_in_features = int(global_in_features or local.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Module, cols: Any, *, transposed: bool = False, **kwargs: Any) -> "RowParallelLinear":
        """Shard an ``nn.Linear`` (or a transposed ``Conv1D``) by input columns; the bias stays whole."""
        weight = linear.weight.t() if transposed else linear.weight
        idx = _index(cols, weight.device)
        w = weight.detach().index_select(1, idx).contiguous()
        b = linear.bias.detach().clone() if getattr(linear, "bias", None) is not None else None
        kwargs.setdefault("global_in_features", weight.shape[1])
        return cls(_new_linear(w, None), b, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            x = x[..., self.in_start:self.in_start + self.in_features]
        y = all_reduce(self.local(x), self.group, self.world_size)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, in={self.in_features} of {self.global_in_features}, "
                f"out={self.out_features}, bias={self.bias is not None}{', split_input' if self.split_input else ''}")


class VocabParallelEmbedding(_ParallelBase):
    """An ``nn.Embedding`` split over the vocabulary: masked local lookup, then an all-reduce.

    ``weight`` is this rank's rows ``[vocab_start, vocab_start + local_vocab)``; ``num_embeddings`` stays the
    global vocabulary size so code that reads it keeps working.
    """

    def __init__(self, weight: torch.Tensor, vocab_start: int, num_embeddings: int, *, padding_idx: Optional[int] = None,
                 group: Any = None, rank: int = 0, world_size: Optional[int] = None) -> None:
        super().__init__(group, rank, world_size)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.vocab_start = int(vocab_start)
        self.vocab_end = self.vocab_start + int(weight.shape[0])
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(weight.shape[1])
        self.padding_idx = padding_idx
        #: Multiplier applied to the looked-up rows (Gemma's scaled embedding); None for a plain embedding.
        self.embed_scale: Any = None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, start: int, size: int, **kwargs: Any) -> "VocabParallelEmbedding":
        w = emb.weight.detach()[start:start + size].clone()
        return cls(w, start, emb.num_embeddings, padding_idx=emb.padding_idx, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1 and self.vocab_start == 0 and self.vocab_end == self.num_embeddings:
            out = F.embedding(input_ids, self.weight)
        else:
            outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
            local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight)
            out = all_reduce(out.masked_fill(outside.unsqueeze(-1), 0), self.group, self.world_size)
        if self.embed_scale is not None:
            scale = self.embed_scale
            out = out * (scale.to(device=out.device, dtype=out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def extra_repr(self) -> str:
        return (f"rank={self.rank}/{self.world_size}, vocab=[{self.vocab_start}, {self.vocab_end}) of "
                f"{self.num_embeddings}, dim={self.embedding_dim}")


class VocabParallelHead(ColumnParallelLinear):
    """The output head split over the vocabulary; logits are all-gathered so every rank sees all of them.

    When the embedding is tied and vocabulary-parallel with the same split, ``local.weight`` is the very same
    parameter as the embedding's shard, so the tie survives sharding.
    """

    def __init__(self, local: nn.Module, **kwargs: Any) -> None:
        kwargs["gather_output"] = True
        super().__init__(local, **kwargs)
