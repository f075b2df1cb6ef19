"""Per-rank work of the geometry tests (config-less plugin model, vision-language wrappers) on gloo ranks.

:func:`run_ranks` spawns ``world`` processes that each run the same tasks (so collectives line up) and returns
``results[rank][task_index]``; a task is ``(name, kwargs)`` naming a function of this module that returns a
JSON-able dict. The spawned processes inherit ``sys.path`` (spawn passes it on), so a plugin installed into a
temporary directory by the parent test is found through its entry point on every rank.
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Dict, List, Sequence, Tuple

import torch

Task = Tuple[str, Dict[str, Any]]


def run_ranks(world: int, tasks: Sequence[Task], timeout: float = 240.0) -> List[List[Dict[str, Any]]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_main, args=(world, port, list(tasks), out), nprocs=world, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=timeout):
            pass
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def _main(rank: int, world: int, port: int, tasks: List[Task], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for name, kwargs in tasks:
        try:
            results.append(globals()[name](**kwargs))
        except BaseException:  # noqa: BLE001 - reported to the parent test
            results.append({"error": traceback.format_exc()})
        dist.barrier()
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def bare_tp(tp: int, inject: bool) -> Dict[str, Any]:
    """The config-less example model, its policy from the installed ``bare`` plugin, split over ``tp`` ranks."""
    import policyinject as pi
    from policyinject_example_bare.modeling import build_bare

    model = build_bare().eval()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(7))
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=inject,
                               tensor_parallel={"tp_size": tp, "tp_grain_size": 8})
    with torch.inference_mode():
        ref, got = ref_model(ids), engine(ids)
    heads = engine.plan.tensor_parallel.to_json()["heads"]
    return {"rel": _rel(got, ref), "heads": heads, "n_heads": [b.attn.n_heads for b in ref_model.blocks],
            "layers": sorted({type(b).__name__ for b in model.blocks}),
            "sources": sorted({m.policy.source for m in engine.plan.layers})}


def wrapper_tp(name: str, tp: int) -> Dict[str, Any]:
    """A tiny vision-language wrapper (text path) under tensor parallelism: heads from ``text_config``."""
    from mm_models import build

    import policyinject as pi

    model = build(name)
    ref_model = copy.deepcopy(model)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(7))
    engine = pi.init_inference(model, dtype="fp32", tensor_parallel={"tp_size": tp, "tp_grain_size": 8})
    with torch.inference_mode():
        ref, got = ref_model(input_ids=ids).logits, engine(input_ids=ids).logits
    return {"rel": _rel(got, ref), "heads": engine.plan.tensor_parallel.to_json()["heads"]}
