"""Tensor-parallel benchmark: a Llama-8B-shaped random model in bf16 at tp 1, 2, 4 in one torchrun launch.

For every tp size in ``--tp`` it builds the same random model (same seed on every rank) on this rank's GPU,
records the single-GPU logits first, shards it with ``init_inference(tensor_parallel={"tp_size": t,
"tp_group": g})`` -- ranks ``[d*t, (d+1)*t)`` form data-parallel replicas ``d`` of the TP group -- and
measures: logits against the single-GPU model (max abs error, relative error by norm, top-1 agreement),
memory per GPU (allocated after sharding, peak during decoding), and greedy decode time per token
(``generate`` of N tokens minus ``generate`` of 1, divided by N-1). It prints the card, dtype, batch size,
prompt length, the tp=1 baseline measured in the same run, and the memory-bandwidth roofline
(weight bytes per GPU / HBM bandwidth).

Launch (one node, 4 GPUs)::

    torchrun --standalone --nproc-per-node 4 benchmarks/tensor_parallel.py --tp 1,2,4 --out tp_bench.json

Graphed tensor-parallel decode (kernel injection + CUDA graphs holding the NCCL all-reduces) next to the
eager rows, and the NCCL all-reduce latency at decode sizes (8-32 KB: one token's hidden state) eager and
replayed from a CUDA graph, per TP group size::

    torchrun --standalone --nproc-per-node 4 benchmarks/tensor_parallel.py --tp 1,2,4 --modes eager,graphed \
        --allreduce-kb 8,16,24,32 --out tp_bench.json

Without torchrun, ``--spawn N`` starts the N processes itself (torch.multiprocessing). Every process runs with
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NVSHMEM_DISABLE_NVLS=1`` (set here before
any process group exists, and in the environment of the processes ``--spawn`` starts): NVLink multicast is
never used.

On a CPU (smoke test only, gloo)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/tensor_parallel.py \\
        --preset smollm2-135m --layers 2 --dtype fp32 --tp 1,2 --new-tokens 4 --prompt 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from policyinject.testing.roofline import copy_bandwidth

#: Set in every process before NCCL starts: no NVLink multicast (NVLS), no multicast symmetric memory.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

#: HBM bandwidth (bytes/s) by card name fragment, for the roofline.
BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}


def bandwidth(name: str) -> float:
    for key, bw in BANDWIDTH.items():
        if key in name:
            return bw
    return float("nan")


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from policyinject.testing.presets import preset_model

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return preset_model(args.preset, dtype=dtype, device=device, seed=0, **overrides).eval()


def build_config(args: argparse.Namespace) -> Any:
    """The preset's model config with the ``--layers`` override (no weights)."""
    import transformers

    from policyinject.testing.presets import SHAPES

    config_cls, _, kwargs = SHAPES[args.preset]
    cfg = getattr(transformers, config_cls)(**kwargs)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms_per_token(gen: Any, ids: torch.Tensor, new_tokens: int, device: torch.device, repeats: int) -> float:
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False)
    gen(ids, max_new_tokens=2, **kw)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        gen(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(device)
        t1 = time.perf_counter()
        gen(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        sync(device)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3)
    return best


def groups_for(tp: int, world: int, rank: int) -> Any:
    """Every rank creates every TP group (same order); returns this rank's."""
    mine = None
    for d in range(world // tp):
        ranks = list(range(d * tp, (d + 1) * tp))
        g = dist.new_group(ranks)
        if rank in ranks:
            mine = g
    return mine


def _median_ms(fn: Any, device: torch.device, repeats: int, inner: int) -> float:
    """Median over ``repeats`` of (time of ``inner`` calls of ``fn``) / ``inner``, in ms; CUDA events on a GPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def allreduce_sweep(group: Any, sizes_kb: List[int], dtype: torch.dtype, device: torch.device,
                    repeats: int = 11, inner: int = 50) -> List[Dict[str, Any]]:
    """All-reduce latency per message size: eager calls, and (NCCL on CUDA) ``inner`` all-reduces captured in
    one CUDA graph and replayed (the cost inside a graphed decode step, launch overhead excluded)."""
    rows = []
    for kb in sizes_kb:
        x = torch.ones(kb * 1024 // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)
        for _ in range(5):
            dist.all_reduce(x, group=group)  # warm-up (communicator, buffers)
        eager = _median_ms(lambda: dist.all_reduce(x, group=group), device, repeats, inner)
        graphed = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for _ in range(inner):
                    dist.all_reduce(x, group=group)
            graph.replay()
            graphed = _median_ms(graph.replay, device, repeats, 1) / inner
        rows.append({"kb": kb, "eager_us": round(eager * 1e3, 2),
                     "graphed_us": round(graphed * 1e3, 2) if graphed is not None else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("--modes", default="eager",
                   help="eager (the model's layers, sharded) and/or graphed (kernel injection + CUDA-graph decode)")
    p.add_argument("--allreduce-kb", default="", help="all-reduce latency sweep sizes in KB, e.g. 8,16,24,32")
    p.add_argument("--spawn", type=int, default=0, help="start this many processes here instead of torchrun")
    args = p.parse_args()
    if args.spawn and "RANK" not in os.environ:
        _spawn(args.spawn)
        return
    run(args)


def _spawn(n: int) -> None:
    """Start ``n`` copies of this script as ranks (torchrun's variables, the no-multicast environment)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        env = {**os.environ, **NO_MULTICAST, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *sys.argv], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"ranks exited with {codes}")


def run(args: argparse.Namespace) -> None:
    from policyinject.pipeline import init_inference

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(t) for t in args.tp.split(",") if world % int(t) == 0]
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    bw = copy_bandwidth(device) if cuda else bandwidth(card)

    g = torch.Generator().manual_seed(1234)
    model = build(args, device)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt), generator=g).to(device)
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    with torch.inference_mode():
        ref = model(ids).logits[:, -16:].float().cpu()
        # The same weights in fp32: the bf16 noise floor that a TP error is judged against.
        ref32 = model.float()(ids).logits[:, -16:].float().cpu()
    floor = float((ref - ref32).norm() / ref32.norm())
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    rows: List[Dict[str, Any]] = []
    sweeps: Dict[int, Any] = {}
    modes = [m for m in args.modes.split(",") if m]
    for tp, mode in [(t, m) for t in sizes for m in modes]:
        group = groups_for(tp, world, rank) if tp > 1 else None
        if args.allreduce_kb and tp > 1 and tp not in sweeps:
            kbs = [int(k) for k in args.allreduce_kb.split(",")]
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
            sweeps[tp] = allreduce_sweep(group, kbs, dtype, device)
        model = build(args, device)
        t0 = time.perf_counter()
        extra: Dict[str, Any] = {}
        if mode == "graphed":
            extra = dict(replace_with_kernel_inject=True, enable_cuda_graph=cuda,
                         max_out_tokens=args.prompt + args.new_tokens + 8, max_batch_size=args.batch)
        if tp > 1 or mode == "graphed":
            tp_cfg = {"tp_size": tp, "tp_group": group} if tp > 1 else {"tp_size": 1}
            engine = init_inference(model, dtype=args.dtype, tensor_parallel=tp_cfg, **extra)
            gen = engine.generate
        else:
            engine, gen = model, model.generate
        shard_s = time.perf_counter() - t0
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        local_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        allocated = torch.cuda.memory_allocated(device) if cuda else local_bytes
        with torch.inference_mode():
            got = engine(ids).logits[:, -16:].float().cpu()
            ms = decode_ms_per_token(gen, ids, args.new_tokens, device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
        rel = float((got - ref).norm() / ref.norm())
        row = {
            "tp": tp, "mode": mode if cuda or mode != "graphed" else "injected", "replicas": world // tp, "decode_ms_per_token": round(ms, 3),
            "weights_gb_per_gpu": round(local_bytes / 2**30, 3), "allocated_gb": round(allocated / 2**30, 3),
            "peak_decode_gb": round(peak / 2**30, 3) if cuda else None,
            "roofline_ms_per_token": round(local_bytes / bw * 1e3, 3) if bw == bw else None,
            "logits_max_abs_err": round(float((got - ref).abs().max()), 5), "logits_rel_err": round(rel, 6),
            "top1_agree": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "rel_err_vs_fp32": round(float((got - ref32).norm() / ref32.norm()), 6),
            "top1_agree_vs_fp32": round(float((got.argmax(-1) == ref32.argmax(-1)).float().mean()), 4),
            "shard_seconds": round(shard_s, 2),
        }
        rows.append(row)
        del engine, gen, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        dist.barrier()

    if rank == 0:
        base = next((r["decode_ms_per_token"] for r in rows if r["tp"] == 1), None)
        hidden = int(getattr(build_config(args), "hidden_size", 0))
        head = {"card": card, "gpus": world, "dtype": args.dtype, "preset": args.preset,
                "layers": args.layers or "preset", "batch": args.batch, "prompt": args.prompt,
                "new_tokens": args.new_tokens, "params_gb": round(param_bytes / 2**30, 2),
                "copy_bandwidth_tb_s": round(bw / 1e12, 3) if bw == bw else None,
                "noise_floor_rel_err_tp1_vs_fp32": round(floor, 6),
                "torch": torch.__version__, "transformers": __import__("transformers").__version__}
        print(json.dumps(head))
        print(f"{'tp':>3} {'mode':>8} {'ms/token':>9} {'speedup':>8} {'roofline':>9} {'weights GB':>10} {'alloc GB':>9} "
              f"{'peak GB':>8} {'max|err|':>9} {'rel err':>9} {'top1':>6} {'vs fp32':>9} {'top1 fp32':>9}")
        for r in rows:
            sp = base / r["decode_ms_per_token"] if base else float("nan")
            print(f"{r['tp']:>3} {r['mode']:>8} {r['decode_ms_per_token']:>9.2f} {sp:>8.2f} {str(r['roofline_ms_per_token']):>9} "
                  f"{r['weights_gb_per_gpu']:>10.2f} {r['allocated_gb']:>9.2f} {str(r['peak_decode_gb']):>8} "
                  f"{r['logits_max_abs_err']:>9.4f} {r['logits_rel_err']:>9.5f} {r['top1_agree']:>6.3f} "
                  f"{r['rel_err_vs_fp32']:>9.5f} {r['top1_agree_vs_fp32']:>9.3f}")
        if not cuda:
            print("mode injected: kernel injection and the decode engine, eager (CUDA graphs need a GPU)")
        print("rel err / top1: against the tp=1 model in the same dtype; vs fp32: against the same weights "
              "computed in fp32 (the tp=1 row is the dtype's own noise floor); speedup: against the first tp=1 row")
        for tp, sweep in sweeps.items():
            layers = int(getattr(build_config(args), "num_hidden_layers", 0))
            elt = torch.tensor([], dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                          "fp32": torch.float32}[args.dtype]).element_size()
            print(f"all-reduce latency, tp {tp} ({args.dtype}); a decode step holds {2 * layers + 1} all-reduces of "
                  f"{hidden * args.batch * elt / 1024:.1f} KB (2 per layer + the embedding) and 1 all-gather")
            print(f"{'KB':>5} {'eager us':>9} {'graphed us':>11}")
            for r in sweep:
                print(f"{r['kb']:>5} {r['eager_us']:>9} {str(r['graphed_us']):>11}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"setup": head, "rows": rows, "allreduce": {str(k): v for k, v in sweeps.items()}},
                          f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
