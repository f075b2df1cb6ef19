"""The tensor-parallel process group: from ``tp_group``, from a Megatron-style ``mpu``, or from torchrun.

:func:`resolve_tp` returns a :class:`TPInfo` (rank inside the TP group, its size, the group handle). It is
stored on the pass context and on every parallel module; nothing here is process-global except what
``torch.distributed`` itself keeps.

With neither ``tp_group`` nor ``mpu``, the default process group is initialised from the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) if needed, with NCCL on CUDA and
gloo on the CPU. When ``WORLD_SIZE`` is a multiple of ``tp_size`` the world is cut into data-parallel replicas
of the TP group: replica ``d`` holds global ranks ``[d * tp, (d + 1) * tp)``.

Example (no distributed environment: a single rank with no group):
    >>> info = TPInfo(rank=0, world_size=1, group=None)
    >>> info.world_size, info.dp_rank
    (1, 0)
    >>> tp_group_ranks(world_size=8, tp_size=4)
    [[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional

import attrs
import torch

from .errors import PlanError


@attrs.define
class TPInfo:
    """Tensor-parallel runtime information for one rank."""

    rank: int
    world_size: int
    group: Any = None
    #: This process's rank in the default group, and which data-parallel replica it belongs to.
    global_rank: int = 0
    dp_rank: int = 0
    backend: str = ""
    #: True when only planning happened (no process group exists, e.g. ``policyinject inspect``).
    planning_only: bool = False


def tp_group_ranks(world_size: int, tp_size: int) -> List[List[int]]:
    """Global ranks of each TP group when ``world_size`` processes form ``world_size // tp_size`` replicas.

    Example:
        >>> tp_group_ranks(6, 3)
        [[0, 1, 2], [3, 4, 5]]
    """
    if tp_size < 1 or world_size % tp_size:
        raise PlanError(f"tensor_parallel.tp_size={tp_size} does not divide the world size {world_size}: "
                        f"launch a multiple of {tp_size} processes (torchrun --nproc-per-node {tp_size})")
    return [list(range(d * tp_size, (d + 1) * tp_size)) for d in range(world_size // tp_size)]


def has_launch_env(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when the torchrun variables needed by ``init_process_group`` are set."""
    env = os.environ if environ is None else environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend(device: Optional[torch.device]) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise.

    Example:
        >>> default_backend(torch.device("cpu"))
        'gloo'
    """
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def _from_mpu(mpu: Any) -> tuple:
    for group_fn, rank_fn, size_fn in (
        ("get_tensor_model_parallel_group", "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"),
        ("get_model_parallel_group", "get_model_parallel_rank", "get_model_parallel_world_size"),
    ):
        if hasattr(mpu, group_fn):
            group = getattr(mpu, group_fn)()
            rank = getattr(mpu, rank_fn)() if hasattr(mpu, rank_fn) else None
            size = getattr(mpu, size_fn)() if hasattr(mpu, size_fn) else None
            return group, rank, size
    raise PlanError("tensor_parallel.mpu has neither get_tensor_model_parallel_group() nor get_model_parallel_group()")


def resolve_tp(tp_size: int, *, tp_group: Any = None, mpu: Any = None, device: Optional[torch.device] = None,
               allow_planning_only: bool = True, timeout_s: float = 300.0) -> TPInfo:
    """Find or create this rank's TP group.

    Order: ``tp_group`` (used as given), ``mpu``, an initialised default group, the torchrun environment
    (every rank must reach the rendezvous within ``timeout_s``, else
    :class:`~policyinject.errors.RankTimeoutError` names the ranks that did not; see
    :func:`policyinject.rank_agreement.init_default_group`).
    Without any of them, returns a planning-only :class:`TPInfo` for rank 0 when ``allow_planning_only``,
    else raises :class:`PlanError` explaining how to launch.

    Example:
        >>> resolve_tp(1).world_size
        1
        >>> resolve_tp(2).planning_only  # no torchrun environment in a doctest
        True
    """
    import torch.distributed as dist

    if tp_group is not None or mpu is not None:
        if tp_group is not None:
            group, rank, size = tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group)
            what = "tensor_parallel.tp_group"
        else:
            group, rank, size = _from_mpu(mpu)
            rank = dist.get_rank(group) if rank is None else rank
            size = dist.get_world_size(group) if size is None else size
            what = "tensor_parallel.mpu"
        if size != tp_size:
            raise PlanError(f"{what} has {size} ranks but tensor_parallel.tp_size={tp_size}")
        g = dist.get_rank()
        return TPInfo(rank=rank, world_size=size, group=group, global_rank=g, dp_rank=g // max(1, size),
                      backend=str(dist.get_backend(group)))
    if tp_size == 1 and not dist.is_initialized():
        return TPInfo(rank=0, world_size=1)
    if not dist.is_initialized():
        if not has_launch_env():
            if allow_planning_only:
                return TPInfo(rank=0, world_size=tp_size, planning_only=True)
            raise PlanError(
                f"tensor_parallel.tp_size={tp_size} needs {tp_size} processes: launch with "
                f"`torchrun --nproc-per-node {tp_size} your_script.py`, or pass tensor_parallel.tp_group")
        backend = default_backend(device)
        if backend == "nccl" and device is not None and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        from .rank_agreement import init_default_group

        init_default_group(backend, timeout_s)
    world, g = dist.get_world_size(), dist.get_rank()
    groups = tp_group_ranks(world, tp_size)
    dp = g // tp_size
    if len(groups) == 1:
        group = dist.group.WORLD
    else:
        group = None
        for ranks in groups:  # every rank must create every group, in the same order
            pg = dist.new_group(ranks)
            if g in ranks:
                group = pg
    return TPInfo(rank=g - dp * tp_size, world_size=tp_size, group=group, global_rank=g, dp_rank=dp,
                  backend=str(dist.get_backend()))
