"""Per-rank work for the rank-agreement and TP-decode tests: each rank runs ITS OWN task list.

:func:`run_per_rank` spawns ``len(tasks)`` processes with ``torch.multiprocessing``; rank ``r`` runs
``tasks[r]`` (a list of ``(name, kwargs)``; ``name`` is a function of this module taking ``rank`` and the
kwargs, returning a picklable dict). With ``init_group=True`` the default gloo group exists before the tasks
(as a user's script that initialised torch.distributed itself); with False only the torchrun variables are
set, so ``init_inference`` creates the group. Exceptions become ``{"error": type name, "message": str}``.
Every process sets the multicast-free NCCL environment (``NCCL_NVLS_ENABLE=0`` and friends).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Dict, List, Sequence, Tuple

import torch

from tp_workers import free_port

Task = Tuple[str, Dict[str, Any]]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_per_rank(tasks: Sequence[Sequence[Task]], init_group: bool = True, backend: str = "gloo",
                 timeout: float = 240.0) -> List[List[Dict[str, Any]]]:
    """Run ``tasks[rank]`` on each of ``len(tasks)`` ranks; returns ``results[rank][task_index]``."""
    import torch.multiprocessing as mp

    os.environ.update(NO_MULTICAST)
    world, port = len(tasks), free_port()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_main, args=(world, port, [list(t) for t in tasks], out, init_group, backend),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the ranks did not finish within {timeout} s (a hang)")
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def _main(rank: int, world: int, port: int, tasks: List[List[Task]], out: str, init_group: bool,
          backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **NO_MULTICAST)
    torch.set_num_threads(1)
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    if init_group:
        dist.init_process_group(backend, rank=rank, world_size=world)
    results = []
    for name, kwargs in tasks[rank]:
        try:
            results.append(globals()[name](rank, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent test
            results.append({"error": type(exc).__name__, "message": str(exc),
                            "missing": getattr(exc, "missing", None), "traceback": traceback.format_exc()})
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ tasks
def _llama(**overrides: Any) -> torch.nn.Module:
    from policyinject.testing.presets import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama", **overrides)


def _types(model: torch.nn.Module) -> List[str]:
    return [type(m).__name__ for m in model.modules()]


def build(rank: int, tp: int = 2, grain: int = 8, overrides: Any = None, timeout: float = 120.0,
          read_delay: float = 0.0, **extra: Any) -> Dict[str, Any]:
    """``init_inference`` of the tiny Llama; reports whether the model was left untouched on failure.
    ``read_delay`` makes this rank start reading the other fingerprints that many seconds late (a slow rank)."""
    from policyinject import rank_agreement
    from policyinject.pipeline import init_inference

    if read_delay:
        waiting = rank_agreement._wait_for

        def late(*args: Any, **kwargs: Any) -> Any:
            time.sleep(read_delay)
            return waiting(*args, **kwargs)

        rank_agreement._wait_for = late  # this process only

    model = _llama(**(overrides or {}))
    before = _types(model)
    started = time.monotonic()
    try:
        init_inference(model, dtype="fp32", tensor_parallel={"tp_size": tp, "tp_grain_size": grain,
                                                             "setup_timeout_s": timeout}, **extra)
    except BaseException as exc:  # noqa: BLE001
        return {"error": type(exc).__name__, "message": str(exc), "missing": getattr(exc, "missing", None),
                "untouched": _types(model) == before, "seconds": time.monotonic() - started,
                "problems": [p.path for p in getattr(exc, "problems", []) if hasattr(p, "path")]}
    return {"ok": True, "seconds": time.monotonic() - started}


def idle(rank: int, seconds: float = 0.0) -> Dict[str, Any]:
    """Never call init_inference (a rank that crashed or took another branch); optionally stay alive."""
    time.sleep(seconds)
    return {"idle": True}


def barrier(rank: int) -> Dict[str, Any]:
    import torch.distributed as dist

    dist.barrier()
    return {"barrier": True}


def count_collectives(rank: int, tp: int = 2, new_tokens: int = 4) -> Dict[str, Any]:
    """Collectives per decode step of the injected TP model through the decode engine (eager, gloo)."""
    import torch.distributed as dist

    from policyinject.pipeline import init_inference

    model = _llama()
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    engine = init_inference(model, dtype="fp32", replace_with_kernel_inject=True,
                            tensor_parallel={"tp_size": tp, "tp_grain_size": 8})
    calls: List[Tuple[str, Tuple[int, ...]]] = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor",
                                                         "reduce_scatter", "broadcast")}

    def counting(name: str) -> Any:
        def fn(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(args[0].shape)
            calls.append((name, shape))
            return originals[name](tensor, *args, **kwargs)
        return fn

    decoder = engine._get_decoder()
    try:
        for name in originals:
            setattr(dist, name, counting(name))
        with torch.inference_mode():
            out = engine.generate(ids, max_new_tokens=new_tokens)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"calls": calls, "layers": layers, "hidden": model.config.hidden_size, "equal": torch.equal(out, ref),
            "decoder": decoder is not None, "new_tokens": new_tokens, "prompt": ids.shape[1]}


def graphs_vs_eager(rank: int, tp: int = 2, new_tokens: int = 16) -> Dict[str, Any]:
    """NCCL ranks: greedy tokens from the graphed TP decode equal the eager TP decode's (and tp 1's)."""
    from policyinject.decode.generate import Decoder
    from policyinject.pipeline import init_inference

    model = _llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    engine = init_inference(model, dtype="bf16", replace_with_kernel_inject=True, enable_cuda_graph=True,
                            max_out_tokens=64, tensor_parallel={"tp_size": tp, "tp_grain_size": 8})
    graphed = engine.generate(ids.cuda(), max_new_tokens=new_tokens).cpu()
    stats = dict(engine._get_decoder().stats)
    eager = Decoder.from_engine(engine, use_graphs=False).generate(ids.cuda(), max_new_tokens=new_tokens).cpu()
    return {"graphed": graphed, "eager": eager, "stats": stats}
