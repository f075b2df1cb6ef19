"""Per-rank work of the expert-parallel tests (gloo, spawned like ``tests/tp/tp_workers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp"))

Task = Tuple[str, Dict[str, Any]]


def run_ranks(world: int, tasks: Sequence[Task], timeout: float = 240.0) -> List[List[Dict[str, Any]]]:
    """Run ``tasks`` (functions of this module) on ``world`` gloo ranks, with ``tests/tp/tp_workers.py``'s
    spawner; returns ``results[rank][task_index]``."""
    import tp_workers

    return tp_workers.run_ranks(world, tasks, timeout, module=__name__)


def ep_block(family: str, tokens: str, dispatch: str) -> Dict[str, Any]:
    """The EP block against the unsharded InjectedMoE and HF's block, on this rank's tokens."""
    import torch.distributed as dist
    from moe_models import tiny_moe_model

    from policyinject.modules.moe import InjectedMoE
    from policyinject.modules.moe_parallel import ExpertParallelMoE

    model, spec = tiny_moe_model(family, num_local_experts=4, num_experts=4)
    block = next(m for m in model.modules() if spec.matches(m))
    rank = dist.get_rank()
    seed = 100 + (rank if tokens == "sharded" else 0)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(seed))
    full = InjectedMoE.build(block, spec, model.config, backend="torch", dispatch=dispatch)
    with torch.no_grad():
        ref, hf = full(x), block(x)
        ep = ExpertParallelMoE(InjectedMoE.build(block, spec, model.config, backend="torch", dispatch=dispatch),
                               tokens=tokens)
        out = ep(x)
    main = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    err = ((main(out) - main(ref)).norm() / main(ref).norm()).item()
    err_hf = ((main(out) - main(hf)).norm() / main(hf).norm()).item()
    return {"err": err, "err_hf": err_hf, "local": [ep.start, ep.end], "w13": list(ep.w13.shape),
            "finite": bool(torch.isfinite(main(out)).all())}


def ep_model(family: str) -> Dict[str, Any]:
    """Full-model logits and greedy tokens with every MoE block expert-parallel (tokens replicated)."""
    from moe_models import tiny_moe_model

    from policyinject.modules.moe import InjectedMoE, inject_moe
    from policyinject.modules.moe_parallel import ExpertParallelMoE

    model, spec = tiny_moe_model(family, num_local_experts=4, num_experts=4)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        paths = inject_moe(model, spec, backend="torch")
        for p in paths:
            parent, _, child = p.rpartition(".")
            moe = model.get_submodule(p)
            assert isinstance(moe, InjectedMoE)
            setattr(model.get_submodule(parent), child, ExpertParallelMoE(moe))
        out = model(ids).logits
    err = ((out - ref).norm() / ref.norm()).item()
    return {"err": err, "greedy_equal": bool(torch.equal(out.argmax(-1), ref.argmax(-1)))}


def pipeline_equal(family: str, tp: int = 1, ep: int = 1, ep_group: str = "") -> Dict[str, Any]:
    """``init_inference`` with kernel injection, ``tensor_parallel.tp_size`` and ``moe.ep_size``: logits and
    greedy tokens against the unsharded Hugging Face model (same weights on every rank, same prompt).

    ``ep_group="tp"``: pass the tensor-parallel group (all ranks) as ``moe.ep_group``."""
    import torch.distributed as dist
    from moe_models import tiny_moe_model

    import policyinject as pi
    from policyinject.modules.moe_parallel import ExpertParallelMoE

    ref_model, _ = tiny_moe_model(family)
    model, spec = tiny_moe_model(family)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(ids).logits
        ref_tokens = ref_model.generate(ids, max_new_tokens=5, do_sample=False)
    moe: Dict[str, Any] = {"ep_size": ep}
    if ep_group == "tp":
        moe["ep_group"] = dist.group.WORLD
    engine = pi.init_inference(model, dtype="fp32", replace_with_kernel_inject=True, kernel_backend="torch",
                               tensor_parallel={"tp_size": tp, "tp_grain_size": 8}, moe=moe)
    blocks = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    with torch.no_grad():
        out = engine(ids).logits
        tokens = engine.generate(ids, max_new_tokens=5, do_sample=False)
    return {"err": ((out - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(out).all()),
            "greedy_equal": bool(torch.equal(tokens, ref_tokens)), "ep_blocks": len(blocks),
            "local": [list(b.w13.shape) for b in blocks][:1], "repr": repr(blocks[0]) if blocks else "",
            "engine_decoder": engine.plan.decode is not None and not engine.plan.decode.problems}
