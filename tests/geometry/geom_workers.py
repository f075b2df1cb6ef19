"""Per-rank work of the geometry tests (config-less plugin model, vision-language wrappers) on gloo ranks.

:func:`run_ranks` spawns ``world`` processes that each run the same tasks (so collectives line up) and returns
``results[rank][task_index]``; a task is ``(name, kwargs)`` naming a function of this module that returns a
JSON-able dict. The spawned processes inherit ``sys.path`` (spawn passes it on), so a plugin installed into a
temporary directory by the parent test is found through its entry point on every rank.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))

Task = Tuple[str, Dict[str, Any]]


def run_ranks(world: int, tasks: Sequence[Task], timeout: float = 240.0) -> List[List[Dict[str, Any]]]:
    """Run ``tasks`` (functions of this module) on ``world`` gloo ranks, with ``tests/tp/tp_workers.py``'s
    spawner; returns ``results[rank][task_index]``."""
    import tp_workers

    return tp_workers.run_ranks(world, tasks, timeout, module=__name__)


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
