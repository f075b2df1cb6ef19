"""Pure split arithmetic for tensor parallelism: head-aligned splits, grain splits, KV-head replication.

Nothing here touches tensors of a model or a process group; every function takes sizes and returns sizes
or index lists, so the rules can be tested exhaustively and reused by planning, loading and saving.

The rules (documented in ``docs/tensor-parallel.md``):

* **Attention heads** (:func:`split_heads`), ``Hq`` query heads in ``Hkv`` groups over ``tp`` ranks:

  (a) ``Hkv >= tp``: whole KV groups (each KV head with its query heads) are dealt out,
      ``Hkv // tp + (rank < Hkv % tp)`` groups per rank. Uneven splits are allowed
      (SmolLM2-135M, 9 q / 3 kv heads, at tp=2: groups [2, 1] -> q heads [6, 3]).
  (b) ``tp > Hkv``: KV heads are replicated. Valid when ``tp % Hkv == 0`` and the ``Hq // Hkv`` query heads
      of a group split evenly over the ``tp // Hkv`` ranks that share the group: every rank holds one KV
      head and a slice of its query heads.
  Otherwise :class:`SplitError` names the dimension and lists the valid ``tp`` sizes.

* **Other dimensions** (:func:`split_sizes`: MLP intermediate, vocabulary, anything without heads) follow
  DeepSpeed's ``tp_grain_size``: the dimension is cut into grains dealt out near-evenly and the last rank
  takes the sub-grain tail; a dimension smaller than one grain is split near-evenly.

Example:
    >>> [s.q_heads for s in split_heads(9, 3, 2)]
    [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    >>> [s.kv_heads for s in split_heads(4, 1, 2)]
    [[0], [0]]
    >>> split_sizes(50257, 2, grain=64)
    [25152, 25105]
"""

from __future__ import annotations

from typing import List, Sequence

import attrs

from .errors import PlanError


class SplitError(PlanError):
    """A dimension cannot be split over the requested ``tp_size``; the message names the dimension."""


@attrs.frozen
class HeadShard:
    """The attention heads one rank holds (global head indices, in order)."""

    rank: int
    q_heads: List[int]
    kv_heads: List[int]
    #: How many ranks hold a copy of each of this rank's KV heads (1 when KV heads are not replicated).
    kv_replicas: int = 1

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head on this rank (HF ``num_key_value_groups``)."""
        return self.num_heads // max(1, self.num_kv_heads)


def valid_head_tp_sizes(num_heads: int, num_kv_heads: int, limit: int = 64) -> List[int]:
    """Every ``tp`` in ``1..limit`` that :func:`split_heads` accepts.

    Example:
        >>> valid_head_tp_sizes(9, 3, limit=12)
        [1, 2, 3, 9]
        >>> valid_head_tp_sizes(32, 8, limit=16)
        [1, 2, 3, 4, 5, 6, 7, 8, 16]
    """
    out = []
    for tp in range(1, limit + 1):
        if _heads_problem(num_heads, num_kv_heads, tp) is None:
            out.append(tp)
    return out


def _heads_problem(num_heads: int, num_kv_heads: int, tp: int) -> "str | None":
    if num_kv_heads <= 0 or num_heads <= 0:
        return f"head counts must be positive (got {num_heads} query, {num_kv_heads} kv heads)"
    if num_heads % num_kv_heads:
        return f"{num_heads} query heads do not group evenly over {num_kv_heads} kv heads"
    if tp <= num_kv_heads:
        return None
    if tp % num_kv_heads:
        return f"tp_size={tp} exceeds the {num_kv_heads} kv heads and is not a multiple of them"
    per_group = num_heads // num_kv_heads
    replicas = tp // num_kv_heads
    if per_group % replicas:
        return (f"tp_size={tp} replicates each of the {num_kv_heads} kv heads on {replicas} ranks, but its "
                f"{per_group} query heads do not split evenly over {replicas}")
    return None


def split_heads(num_heads: int, num_kv_heads: int, tp: int, where: str = "attention") -> List[HeadShard]:
    """Assign query and KV heads to ``tp`` ranks following rules (a) and (b) above.

    ``where`` names the module in error messages.

    Example:
        >>> [(s.q_heads, s.kv_heads) for s in split_heads(4, 2, 4)]
        [([0], [0]), ([1], [0]), ([2], [1]), ([3], [1])]
        >>> split_heads(4, 4, 8)
        Traceback (most recent call last):
        ...
        policyinject.tp_split.SplitError: attention: cannot split heads over tp_size=8: tp_size=8 replicates each of the 4 kv heads on 2 ranks, but its 1 query heads do not split evenly over 2; valid tp sizes for 4 query / 4 kv heads: 1, 2, 3, 4
    """
    problem = _heads_problem(num_heads, num_kv_heads, tp)
    if problem is not None:
        valid = ", ".join(str(t) for t in valid_head_tp_sizes(num_heads, num_kv_heads, limit=max(tp, 64)))
        raise SplitError(f"{where}: cannot split heads over tp_size={tp}: {problem}; valid tp sizes for "
                         f"{num_heads} query / {num_kv_heads} kv heads: {valid}")
    per_group = num_heads // num_kv_heads
    shards: List[HeadShard] = []
    if tp <= num_kv_heads:
        counts = [num_kv_heads // tp + (r < num_kv_heads % tp) for r in range(tp)]
        start = 0
        for r, n in enumerate(counts):
            kv = list(range(start, start + n))
            q = [g * per_group + j for g in kv for j in range(per_group)]
            shards.append(HeadShard(r, q, kv, 1))
            start += n
        return shards
    replicas = tp // num_kv_heads
    q_per_rank = per_group // replicas
    for r in range(tp):
        g, part = divmod(r, replicas)
        q = [g * per_group + part * q_per_rank + j for j in range(q_per_rank)]
        shards.append(HeadShard(r, q, [g], replicas))
    return shards


def split_sizes(total: int, tp: int, grain: int = 1, where: str = "dimension") -> List[int]:
    """Sizes of ``tp`` shards of a dimension of ``total`` elements, following ``tp_grain_size``.

    With ``total >= grain``: ``total // grain`` grains dealt out as ``n // tp + (rank < n % tp)``, the last rank
    taking the sub-grain tail (DeepSpeed ``get_shard_size``). Smaller dimensions split near-evenly. A rank may
    never get zero elements: that raises :class:`SplitError`.

    Example:
        >>> split_sizes(1536, 2, grain=64), split_sizes(101, 2, grain=128), split_sizes(128, 3)
        ([768, 768], [51, 50], [43, 43, 42])
    """
    if tp < 1:
        raise SplitError(f"{where}: tp_size must be at least 1, got {tp}")
    grain = max(1, int(grain))
    if total < tp:
        raise SplitError(f"{where}: {total} elements cannot split over tp_size={tp} (a rank would get none)")
    if total >= grain and total // grain >= tp:
        grains = total // grain
        sizes = [(grains // tp + (r < grains % tp)) * grain for r in range(tp)]
        sizes[-1] += total - grains * grain
    else:
        sizes = [total // tp + (r < total % tp) for r in range(tp)]
    assert sum(sizes) == total
    return sizes


def offsets(sizes: Sequence[int]) -> List[int]:
    """Start offsets of consecutive shards.

    Example:
        >>> offsets([3, 2, 2])
        [0, 3, 5]
    """
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def shard_range(total: int, tp: int, rank: int, grain: int = 1, where: str = "dimension") -> range:
    """The index range of ``rank``'s shard of a grain-split dimension.

    Example:
        >>> shard_range(10, 3, 2)
        range(7, 10)
    """
    sizes = split_sizes(total, tp, grain, where)
    start = offsets(sizes)[rank]
    return range(start, start + sizes[rank])


def head_rows(heads: Sequence[int], head_dim: int, base: int = 0) -> List[int]:
    """Row indices of the given heads in a ``[heads * head_dim]`` dimension starting at ``base``.

    Example:
        >>> head_rows([1, 3], 2)
        [2, 3, 6, 7]
    """
    return [base + h * head_dim + i for h in heads for i in range(head_dim)]


def runs(index: Sequence[int]) -> List[tuple]:
    """Compress an index list into ``(start, length)`` runs of consecutive indices.

    Example:
        >>> runs([0, 1, 2, 6, 7, 9])
        [(0, 3), (6, 2), (9, 1)]
    """
    out: List[list] = []
    for i in index:
        i = int(i)
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return [tuple(r) for r in out]
