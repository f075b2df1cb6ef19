"""Models larger than the GPU's 16-bit capacity, and the peak memory of building an engine.

Parts (``--parts``, all by default), each printing one JSON line and appending it to ``--json``:

* ``build-8b``: a Llama-3-8B shape built in bf16 on the GPU, then ``init_inference(kernel injection)``:
  peak GPU memory while building vs the final footprint (``torch.cuda.max_memory_allocated``).
* ``70b-int8`` / ``70b-int4``: a Llama-3-70B shape on the meta device, weights materialised layer by layer on
  the GPU from seeded random values (``checkpoint={"type": "random"}``) and quantized as they are made: build
  time, peak GPU memory vs the quantized size, batch-1 decode ms/token vs the read roofline (quantized bytes /
  measured copy bandwidth). int4 uses symmetric round-to-nearest (``--int4-method``) to bound build time.
* ``ckpt-8b-int8``: a real sharded safetensors checkpoint of the 8B shape written to disk (random bf16
  values), loaded into a meta model with ``dtype="int8"`` under ``torch.cuda.set_per_process_memory_fraction``
  below the bf16 size; peak GPU and host memory, ms/token.

Run:  python benchmarks/large_model.py --json large.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict

import torch

GIB = float(1 << 30)


def llama3_70b_config() -> Any:
    import transformers

    return transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                    rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)


def meta_model(config: Any) -> torch.nn.Module:
    import transformers

    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


def decode_ms(engine: Any, vocab: int, prompt: int = 32, short: int = 8, long: int = 72) -> float:
    """Batch-1 greedy ms per generated token: (t(long) - t(short)) / (long - short), median of 3."""
    ids = torch.randint(0, vocab, (1, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(short), run(long)  # warm-up: kernels compiled, cache allocated
    diffs = sorted(run(long) - run(short) for _ in range(3))
    return diffs[1] / (long - short) * 1e3


def _fresh() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def build_8b(args: Any) -> Dict[str, Any]:
    import policyinject as pi
    from policyinject.testing.presets import preset_model

    _fresh()
    model = preset_model("llama-3-8b", dtype=torch.bfloat16, device="cuda", eos_token_id=None)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = pi.init_inference(model, dtype="bf16", replace_with_kernel_inject=True)
    torch.cuda.synchronize()
    out = {"build_s": round(time.perf_counter() - t0, 2), "weights_gib": weights / GIB,
           "final_gib": torch.cuda.memory_allocated() / GIB, "peak_gib": torch.cuda.max_memory_allocated() / GIB}
    out["peak_over_final"] = out["peak_gib"] / out["final_gib"]
    del engine, model
    return out


def big(bits: int, args: Any, bandwidth: float) -> Dict[str, Any]:
    import policyinject as pi

    _fresh()
    cfg = llama3_70b_config()
    meta = meta_model(cfg)
    quant = {"enabled": True, "weight": {"num_bits": bits}}
    if bits == 4:
        quant["weight"].update(q_type="symmetric" if args.int4_method == "rtn" else "asymmetric",
                               method=args.int4_method)
    t0 = time.perf_counter()
    engine = pi.init_inference(meta, quant=quant, checkpoint={"type": "random", "seed": 0},
                               replace_with_kernel_inject=True, max_out_tokens=256,
                               enable_cuda_graph=args.cuda_graph)
    torch.cuda.synchronize()
    build = time.perf_counter() - t0
    final = torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    pbytes = engine.report["parameter_bytes"]
    layer_bf16 = sum(p.numel() * 2 for p in meta_model(cfg).model.layers[0].parameters())
    ms = decode_ms(engine, cfg.vocab_size)
    roof = pbytes / bandwidth * 1e3
    out = {"bits": bits, "cuda_graph": args.cuda_graph, "build_s": round(build, 1), "parameter_gib": pbytes / GIB, "final_gib": final / GIB,
           "peak_gib": peak / GIB, "one_layer_bf16_gib": layer_bf16 / GIB,
           "peak_within_quantized_plus_layer": peak <= final + layer_bf16,
           "ms_per_token": round(ms, 3), "roofline_ms": round(roof, 3), "fraction_of_roofline": round(roof / ms, 3),
           "summary": engine.report["summary"].get("weight bytes (planned)")}
    del engine, meta
    return out


def ckpt_8b(args: Any, bandwidth: float) -> Dict[str, Any]:
    import transformers

    import policyinject as pi
    from policyinject.checkpoint import reset_peak, rss_status
    from policyinject.testing.presets import SHAPES
    from policyinject.testing.random_weights import write_random_checkpoint

    _fresh()
    _, _, kw = SHAPES["llama-3-8b"]
    cfg = transformers.LlamaConfig(**{**kw, "eos_token_id": None, "bos_token_id": None})
    directory = tempfile.mkdtemp(prefix="ckpt8b-", dir=args.tmp)
    t0 = time.perf_counter()
    files = write_random_checkpoint(meta_model(cfg), directory, dtype=torch.bfloat16, shard_bytes=4 << 30,
                                    device="cuda")
    write_s = time.perf_counter() - t0
    disk = sum(os.path.getsize(os.path.join(directory, f)) for f in set(files.values()))
    largest_shard = max(os.path.getsize(os.path.join(directory, f)) for f in set(files.values()))
    _fresh()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = 0.75 * disk  # below the bf16 size
    torch.cuda.set_per_process_memory_fraction(cap / total)
    reset_peak()
    host0 = rss_status()["rss"]
    t0 = time.perf_counter()
    engine = pi.init_inference(meta_model(cfg), dtype="int8", checkpoint=directory, replace_with_kernel_inject=True,
                               max_out_tokens=256, enable_cuda_graph=args.cuda_graph)
    torch.cuda.synchronize()
    build = time.perf_counter() - t0
    host_peak = rss_status()["hwm"] - host0
    out = {"cuda_graph": args.cuda_graph, "checkpoint_gib": disk / GIB, "shards": len(set(files.values())), "largest_shard_gib": largest_shard / GIB,
           "write_s": round(write_s, 1), "gpu_cap_gib": cap / GIB, "build_s": round(build, 1),
           "final_gib": torch.cuda.memory_allocated() / GIB, "peak_gib": torch.cuda.max_memory_allocated() / GIB,
           "host_peak_above_start_gib": host_peak / GIB}
    pbytes = engine.report["parameter_bytes"]
    ms = decode_ms(engine, cfg.vocab_size)
    out.update(ms_per_token=round(ms, 3), roofline_ms=round(pbytes / bandwidth * 1e3, 3))
    del engine
    shutil.rmtree(directory, ignore_errors=True)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["70b-int8", "70b-int4", "build-8b", "ckpt-8b-int8"])
    ap.add_argument("--int4-method", default="rtn", choices=["rtn", "hqq"])
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                    help="eager decode steps (default: CUDA graphs, enable_cuda_graph=True)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tmp", default=None, help="where the 8B checkpoint is written (16 GB)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from policyinject.testing.roofline import copy_bandwidth

    bandwidth = copy_bandwidth(torch.device("cuda"), 1 << 30)
    import transformers
    import triton

    env = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({"part": "env", **env}), flush=True)
    parts: Dict[str, Callable[[], Dict[str, Any]]] = {
        "build-8b": lambda: build_8b(args), "70b-int8": lambda: big(8, args, bandwidth),
        "70b-int4": lambda: big(4, args, bandwidth), "ckpt-8b-int8": lambda: ckpt_8b(args, bandwidth)}
    for name in args.parts:
        try:
            row = {"part": name, **parts[name]()}
        except Exception as exc:  # one failing part still reports the others
            row = {"part": name, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
