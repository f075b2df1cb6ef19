"""Per-rank work for the tensor-parallel tests, spawned with ``torch.multiprocessing`` over gloo.

:func:`run_ranks` starts ``world`` processes that each run the same list of tasks (so collectives line up),
and returns every rank's results. A task is ``(name, kwargs)``; ``name`` is a function of this module that
returns a JSON-able dict. Exceptions are caught per task and returned as ``{"error": traceback}``, so one
failing check does not hide the others in the same spawn.
"""

from __future__ import annotations

import importlib
import os
import pickle
import socket
import tempfile
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

Task = Tuple[str, Dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, tasks: Sequence[Task], timeout: float = 240.0,
              module: Optional[str] = None) -> List[List[Dict[str, Any]]]:
    """Run ``tasks`` on ``world`` gloo ranks; returns ``results[rank][task_index]``.

    ``module``: the importable name of the module whose functions the task names are (default: this one);
    the other test directories' worker modules pass their own ``__name__``."""
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_main, args=(world, port, list(tasks), out, module), nprocs=world, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=timeout):
            pass
        results = []
        for rank in range(world):
            with open(os.path.join(out, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def _main(rank: int, world: int, port: int, tasks: List[Task], out: str, module: Optional[str] = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for name, kwargs in tasks:
        try:
            where = vars(importlib.import_module(module)) if module else globals()
            results.append(where[name](**kwargs))
        except BaseException:  # noqa: BLE001 - reported to the parent test
            results.append({"error": traceback.format_exc()})
        dist.barrier()
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ helpers
def init_inference(*args: Any, **kwargs: Any) -> Any:
    from policyinject.pipeline import init_inference as _init

    return _init(*args, **kwargs)


def _ids(vocab: int, batch: int = 2, length: int = 7, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # identical on every rank, whatever each rank did before
    return torch.randint(3, vocab, (batch, length), generator=g)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out[0]


def _summary(engine: Any) -> Dict[str, Any]:
    layout = engine.plan.tensor_parallel
    tp_actions = engine.plan.for_pass("tensor_parallel")
    return {"heads": layout.to_json()["heads"] if layout is not None else {},
            "actions": sorted({a.action for a in tp_actions}),
            "by": sorted({str(a.details.get("by", "policy")) for a in tp_actions if "style" in a.details}),
            "load": layout.load if layout is not None else None}


def _compare(model: torch.nn.Module, engine_fn: Any, ids: torch.Tensor, generate: bool, new_tokens: int = 6,
             hf: bool = True) -> Dict[str, Any]:
    """Reference forward (and greedy generation) on the unsharded model, then the same through ``engine_fn``."""
    gen_kwargs: Dict[str, Any] = {"max_new_tokens": new_tokens}
    if hf:
        gen_kwargs.update(attention_mask=torch.ones_like(ids), do_sample=False)
    with torch.inference_mode():
        ref = _logits(model(ids)).float().clone()
        ref_gen = None
        if generate:
            ref_gen = model.generate(ids, **gen_kwargs)
    engine = engine_fn(model)
    with torch.inference_mode():
        got = _logits(engine(ids)).float()
        res = {"max_err": float((got - ref).abs().max()), "ref_scale": float(ref.abs().max()),
               "shape_ok": tuple(got.shape) == tuple(ref.shape)}
        if generate:
            gen = engine.generate(ids, **gen_kwargs)
            res["gen_equal"] = bool(torch.equal(gen.cpu(), ref_gen.cpu()))
    res.update(_summary(engine))
    return res


# ------------------------------------------------------------------------------------------ tasks
def hf_equal(arch: str, tp: int, overrides: Optional[dict] = None, plugins: str = "default", generate: bool = True,
             grain: int = 8, extra: Optional[dict] = None) -> Dict[str, Any]:
    """A tiny HF model of ``arch``: TP logits and greedy tokens equal the unsharded model's."""
    from policyinject import PluginManager
    from policyinject.testing.presets import preset_model, tiny_model

    overrides = dict(overrides or {})
    if arch.startswith("preset:"):
        model = preset_model(arch.split(":", 1)[1], dtype=torch.float32, **overrides)
    else:
        model = tiny_model(arch, **overrides)
    vocab = model.config.vocab_size
    pm = PluginManager.empty() if plugins == "none" else None

    def engine_fn(m: torch.nn.Module) -> Any:
        kwargs = {"dtype": "fp32", **(extra or {})}
        return init_inference(m, plugins=pm, tensor_parallel={"tp_size": tp, "tp_grain_size": grain}, **kwargs)

    return _compare(model, engine_fn, _ids(vocab), generate and arch != "bert")


def toy_equal(tp: int, form: str, heads: int = 6) -> Dict[str, Any]:
    """The example plugin's plain-PyTorch toy model under TP through one policy form.

    ``form``: ``policy`` (a Policy object), ``deepspeed`` (the tuple short form), ``plugin`` (the installed
    entry-point plugin), ``autotp`` (no policy at all).
    """
    from policyinject import PluginManager
    from policyinject.policy import AttentionSpec, MLPSpec, Policy
    from policyinject_example_plugin.modeling import ToyBlock, ToyConfig, ToyForCausalLM

    torch.manual_seed(0)
    model = ToyForCausalLM(ToyConfig(num_attention_heads=heads)).eval()
    kwargs: Dict[str, Any] = {}
    pm = PluginManager.empty()
    if form == "policy":
        kwargs["injection_policy"] = {ToyBlock: Policy(
            layer=ToyBlock,
            attention=AttentionSpec(module="attn", q="q_proj", k="k_proj", v="v_proj", o="out_proj",
                                    num_heads="num_attention_heads", num_kv_heads="num_attention_heads",
                                    tp_attributes={"num_heads": "heads"}),
            mlp=MLPSpec(module="mlp", fc1="fc1", fc2="fc2", activation="gelu"))}
    elif form == "deepspeed":
        kwargs["injection_policy"] = {ToyBlock: ("attn.out_proj", "mlp.fc2")}
    elif form == "plugin":
        pm = None  # the default manager loads the installed example plugin through its entry point
    elif form != "autotp":
        raise ValueError(form)

    def engine_fn(m: torch.nn.Module) -> Any:
        return init_inference(m, plugins=pm, dtype="fp32", tensor_parallel={"tp_size": tp, "tp_grain_size": 8},
                                 **kwargs)

    res = _compare(model, engine_fn, _ids(128), generate=True, hf=False)
    res["num_heads"] = [b.attn.num_heads for b in model.blocks]
    return res


def plan_error(arch: str, tp: int, overrides: Optional[dict] = None) -> Dict[str, Any]:
    """Planning fails with a PlanError (and the model is untouched)."""
    from policyinject.errors import PlanError
    from policyinject.testing.presets import tiny_model

    model = tiny_model(arch, **(overrides or {}))
    before = [type(m).__name__ for m in model.modules()]
    try:
        init_inference(model, dtype="fp32", tensor_parallel={"tp_size": tp})
    except PlanError as exc:
        return {"message": str(exc), "untouched": before == [type(m).__name__ for m in model.modules()]}
    return {"message": None}


def meta_checkpoint(ckpt: str, tp: int, config: Dict[str, Any], save_to: Optional[str] = None) -> Dict[str, Any]:
    """Meta-device model + ``checkpoint=`` a safetensors dir: each rank reads its slices; logits equal."""
    import transformers

    cfg = transformers.LlamaConfig(**config)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    extra = {"save_mp_checkpoint_path": save_to} if save_to else {}
    engine = init_inference(meta, dtype="fp32", tensor_parallel={"tp_size": tp, "tp_grain_size": 8},
                               checkpoint=ckpt, **extra)
    meta_left = [n for n, p in meta.named_parameters() if p.device.type == "meta"]
    meta_left += [n for n, b in meta.named_buffers() if b.device.type == "meta"]
    load = engine.plan.tensor_parallel.load
    local_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    ref = _reference_from(ckpt, cfg) if os.path.exists(os.path.join(ckpt, "model.safetensors")) else None
    ids = _ids(cfg.vocab_size)
    with torch.inference_mode():
        got = _logits(engine(ids)).float()
    res = {"meta_left": meta_left, "load": load, "local_param_mb": local_bytes / 2**20, "logits": got}
    if ref is not None:
        with torch.inference_mode():
            want = _logits(ref(ids)).float()
        res["max_err"] = float((got - want).abs().max())
    return res


def _reference_from(ckpt: str, cfg: Any) -> torch.nn.Module:
    import transformers
    from safetensors.torch import load_file

    model = transformers.LlamaForCausalLM(cfg).eval()
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def dp_replicas(tp: int) -> Dict[str, Any]:
    """World larger than tp_size: this rank's TP group is its data-parallel replica's ranks."""
    import torch.distributed as dist

    from policyinject.distributed import resolve_tp

    info = resolve_tp(tp)
    ranks = None
    if info.group is not None:
        t = torch.tensor([dist.get_rank()])
        parts = [torch.zeros_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t, group=info.group)
        ranks = [int(p) for p in parts]
    return {"rank": info.rank, "dp_rank": info.dp_rank, "group_ranks": ranks}


@torch.no_grad()
def modules_math(tp: int) -> Dict[str, Any]:
    """Parallel modules against their unsharded counterparts (uneven shards, bias once, cat, gather)."""
    import torch.distributed as dist

    from policyinject.modules.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding, VocabParallelHead)
    from policyinject.tp_split import offsets, split_sizes

    rank = dist.get_rank()
    torch.manual_seed(0)
    full1 = torch.nn.Linear(12, 22)
    full2 = torch.nn.Linear(22, 12)
    emb = torch.nn.Embedding(37, 12)
    x = torch.randn(3, 5, 12)
    sizes = split_sizes(22, tp, 4)
    start = offsets(sizes)[rank]
    rows = range(start, start + sizes[rank])
    col = ColumnParallelLinear.from_linear(full1, rows, out_sizes=sizes)
    row = RowParallelLinear.from_linear(full2, rows)
    mlp_err = float((row(torch.relu(col(x))) - full2(torch.relu(full1(x)))).abs().max())
    gathered = ColumnParallelLinear.from_linear(full1, rows, out_sizes=sizes, gather_output=True)
    gather_err = float((gathered(x) - full1(x)).abs().max())
    vs = split_sizes(37, tp, 8)
    vstart = offsets(vs)[rank]
    pe = VocabParallelEmbedding.from_embedding(emb, vstart, vs[rank])
    ids = torch.randint(0, 37, (3, 5))
    emb_err = float((pe(ids) - emb(ids)).abs().max())
    head = VocabParallelHead(torch.nn.Linear(12, vs[rank], bias=False), out_sizes=vs)
    head.local.weight = pe.weight  # tied
    head_err = float((head(x) - x @ emb.weight.t()).abs().max())
    # cat of two column shards (fusing q|k after TP) equals the two separately
    a = ColumnParallelLinear.from_linear(full1, rows, out_sizes=sizes)
    fused = ColumnParallelLinear.cat([a, col])
    cat_err = float((fused(x) - torch.cat([a(x), col(x)], -1)).abs().max())
    return {"mlp_err": mlp_err, "gather_err": gather_err, "emb_err": emb_err, "head_err": head_err,
            "cat_err": cat_err, "fused_sizes": fused.out_sizes}


def coverage_equal(model_type: str, tp: int, grain: int = 8) -> Dict[str, Any]:
    """A tiny random model of any installed ``model_type`` (no policy needed): TP logits equal the unsharded."""
    from policyinject.testing.coverage import tiny_causal_lm

    model = tiny_causal_lm(model_type)
    vocab = model.get_input_embeddings().num_embeddings

    def engine_fn(m: torch.nn.Module) -> Any:
        return init_inference(m, dtype="fp32", tensor_parallel={"tp_size": tp, "tp_grain_size": grain})

    return _compare(model, engine_fn, _ids(min(vocab, 200)), generate=False)
