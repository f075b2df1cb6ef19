"""Every rank of a tensor-parallel layer simulated on one process, with no process group.

:class:`SimulatedCollectives` stands in for the process group of ``n`` rank copies of one layer. The copies run
one after the other; a collective (the all-reduce of a row-parallel linear, the all-gather of a gathered
column-parallel linear) can only be answered once every rank has reached it, so the copies are run in passes:
in pass ``p`` every rank computes exactly up to its collective number ``p`` (the earlier ones are answered from
the previous passes), records its contribution there, and answers later collectives with a placeholder. After
the pass, collective ``p`` is combined as the split says (a sum for row-parallel partial outputs, a
concatenation for gathered columns). With ``k`` collectives in the forward, pass ``k`` computes every rank's
exact output. The parallel modules of :mod:`policyinject.modules.tensor_parallel` call the group's
``simulated_all_reduce`` / ``simulated_all_gather`` when their group handle is a :class:`SimulatedRank`.

Example:
    >>> import torch
    >>> from policyinject.modules.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    >>> _ = torch.manual_seed(0); up, down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    >>> sim = SimulatedCollectives(2)
    >>> def shard(r):
    ...     g = sim.rank(r)
    ...     return torch.nn.Sequential(
    ...         ColumnParallelLinear.from_linear(up, rows=range(4 * r, 4 * r + 4), group=g, rank=r, world_size=2),
    ...         RowParallelLinear.from_linear(down, cols=range(4 * r, 4 * r + 4), group=g, rank=r, world_size=2))
    >>> x = torch.randn(3, 4)
    >>> outs = sim.run([shard(0), shard(1)], lambda m: m(x))
    >>> all(torch.allclose(o, down(up(x)), atol=1e-6) for o in outs), sim.count
    (True, 1)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["SimulatedCollectives", "SimulatedRank", "SimulationError"]


class SimulationError(RuntimeError):
    """The simulated ranks disagree about their collectives (a different count, kind or shape)."""


class SimulatedRank:
    """The group handle of one simulated rank: numbers its collectives and asks the shared state for answers."""

    def __init__(self, shared: "SimulatedCollectives", rank: int) -> None:
        self.shared = shared
        self.rank = rank
        self.calls = 0

    def simulated_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._collective("all_reduce", x, None)

    def simulated_all_gather(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return self._collective("all_gather", x, tuple(int(s) for s in sizes))

    def _collective(self, kind: str, x: torch.Tensor, sizes: Optional[Tuple[int, ...]]) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        return self.shared.answer(k, self.rank, kind, x, sizes)


class SimulatedCollectives:
    """The collectives of ``world`` simulated ranks (see the module docstring)."""

    def __init__(self, world: int, max_passes: int = 64) -> None:
        self.world = world
        self.max_passes = max_passes
        self._ranks = [SimulatedRank(self, r) for r in range(world)]
        self._pass = 0
        self._pending: Dict[int, Tuple[str, Optional[Tuple[int, ...]], Dict[int, torch.Tensor]]] = {}
        self._done: List[Tuple[str, torch.Tensor]] = []

    def rank(self, r: int) -> SimulatedRank:
        """The group handle to give rank ``r``'s parallel modules."""
        return self._ranks[r]

    @property
    def count(self) -> int:
        """How many collectives one forward issued (known after :meth:`run`)."""
        return len(self._done)

    def answer(self, k: int, rank: int, kind: str, x: torch.Tensor, sizes: Optional[Tuple[int, ...]]) -> torch.Tensor:
        if k < len(self._done):
            done_kind, value = self._done[k]
            if done_kind != kind:
                raise SimulationError(f"collective #{k}: rank {rank} issues an {kind}, the ranks before it an "
                                      f"{done_kind}")
            return value.clone()
        if k == len(self._done):
            entry = self._pending.setdefault(k, (kind, sizes, {}))
            if entry[0] != kind or entry[1] != sizes:
                raise SimulationError(f"collective #{k}: rank {rank} issues an {kind} {sizes or ''}, another rank an "
                                      f"{entry[0]} {entry[1] or ''}")
            entry[2][rank] = x.detach().clone()
        if kind == "all_gather":  # a placeholder of the gathered shape
            return F.pad(x, (0, sum(sizes) - x.shape[-1]))
        return x

    def _combine(self) -> None:
        k = len(self._done)
        kind, sizes, parts = self._pending.pop(k)
        missing = [r for r in range(self.world) if r not in parts]
        if missing:
            raise SimulationError(f"collective #{k} ({kind}) is issued by some ranks but not by rank(s) {missing}")
        shapes = {tuple(parts[r].shape[:-1]) if kind == "all_gather" else tuple(parts[r].shape) for r in parts}
        if len(shapes) > 1:
            raise SimulationError(f"collective #{k} ({kind}): the ranks contribute tensors of different shapes "
                                  f"{sorted(shapes)}")
        if kind == "all_reduce":
            value = sum(parts[r] for r in range(1, self.world)) + parts[0]
        else:
            for r in range(self.world):
                if parts[r].shape[-1] != sizes[r]:
                    raise SimulationError(f"all-gather #{k}: rank {r} contributes {parts[r].shape[-1]} features, "
                                          f"the split says {sizes[r]}")
            value = torch.cat([parts[r] for r in range(self.world)], dim=-1)
        self._done.append((kind, value))

    def run(self, shards: Sequence[Any], forward: Callable[[Any], Any]) -> List[Any]:
        """Run ``forward(shard)`` for every rank's shard until every collective is answered; every rank's output."""
        if len(shards) != self.world:
            raise ValueError(f"{len(shards)} shards for {self.world} ranks")
        for _ in range(self.max_passes):
            outs = []
            for r, shard in enumerate(shards):
                self._ranks[r].calls = 0
                outs.append(forward(shard))
            calls = [h.calls for h in self._ranks]
            if len(set(calls)) > 1:
                raise SimulationError(f"the ranks issue different numbers of collectives: {calls}")
            if calls[0] == len(self._done):
                return outs
            self._combine()
        raise SimulationError(f"more than {self.max_passes} collectives in one forward")
