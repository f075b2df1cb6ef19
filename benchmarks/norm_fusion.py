"""Residual add + RMSNorm folded into the next decode GEMV (``gemv_rms_norm``), measured two ways on a GPU:

1. per call, on the qkv and gate|up shapes of Llama-3.2-1B and Llama-3-8B: the two-kernel path (``add_rms_norm``
   then ``gemv``/``gemv_gated``) against the fused kernel with its default tile and a few others, back to back
   in one CUDA graph, rotating over enough weights to defeat the L2 (``policyinject.testing.roofline``);
2. whole decode steps: one engine per model (kernels + CUDA graphs, bf16, batch 1), each block's ``fuse_norms``
   switched off and on in turn (A B A B ...), median ms/token of each, and whether the greedy tokens agree.

Run on a GPU:  python benchmarks/norm_fusion.py [--models llama-3.2-1b llama-3-8b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import Any, Dict, List

import torch

SHAPES = {"llama-3.2-1b": {"qkv": (3072, 2048), "gate_up": (16384, 2048)},
          "llama-3-8b": {"qkv": (6144, 4096), "gate_up": (28672, 4096)}}
TILES = [{"BN": 2, "BK": 2048, "num_warps": 8}, {"BN": 4, "BK": 1024, "num_warps": 8},
         {"BN": 4, "BK": 1024, "num_warps": 4}, {"BN": 8, "BK": 512, "num_warps": 4},
         {"BN": 16, "BK": 256, "num_warps": 4}]


def per_call(model: str, copy_tbs: float, report: Dict[str, Any], dev: torch.device = torch.device("cuda")
             ) -> None:
    from policyinject.kernels.gemv import gemv, gemv_gated, gemv_rms_norm, gemv_rms_norm_config
    from policyinject.kernels.norms import add_rms_norm
    from policyinject.testing.roofline import steady_state_seconds

    for role, (n, k) in SHAPES[model].items():
        gated = role == "gate_up"
        count = max(2, min(16, math.ceil(4 * 50 * 2**20 / (n * k * 2))))
        ws = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(count)]
        xs = [torch.randn(1, k, device=dev).to(torch.bfloat16) for _ in range(count)]
        rs = [torch.randn(1, k, device=dev).to(torch.bfloat16) for _ in range(count)]
        g = (torch.rand(k, device=dev) + 0.5).to(torch.bfloat16)

        def us(fn) -> float:
            return steady_state_seconds(fn, [(i,) for i in range(count)], calls=2 * count, device=dev) * 1e6

        def two_kernels(i: int) -> Any:
            normed, _ = add_rms_norm(xs[i], rs[i], g, 1e-5)
            return gemv_gated(normed, ws[i]) if gated else gemv(normed, ws[i])

        ref = two_kernels(0).float()
        base = us(two_kernels)
        gemv_only = us(lambda i: gemv_gated(xs[i], ws[i]) if gated else gemv(xs[i], ws[i]))
        roof = n * k * 2 / (copy_tbs * 1e12) * 1e6
        print(f"\n{model} {role} {n}x{k} (weights at copy speed {roof:.1f} us): add_rms_norm + GEMV {base:.1f} us, "
              f"GEMV alone {gemv_only:.1f} us", flush=True)
        default = gemv_rms_norm_config(n, k, gated)
        rows = [{"model": model, "role": role, "kernel": "two kernels", "us": base},
                {"model": model, "role": role, "kernel": "gemv alone", "us": gemv_only}]
        for tile in [default] + [t for t in TILES if t != default]:
            if gated and tile["BN"] % 2:
                continue
            fn = lambda i, t=tile: gemv_rms_norm(xs[i], rs[i], g, 1e-5, ws[i], gated=gated, config=t)  # noqa: E731
            out = fn(0)[0].float()
            err = float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("inf")
            t_us = us(fn)
            label = "fused (default)" if tile is default else "fused"
            print(f"  {label:16s} {tile}: {t_us:6.1f} us ({base / t_us:.2f}x the two kernels, {roof / t_us:.0%} of "
                  f"copy), rel err vs two kernels {err:.1e}", flush=True)
            rows.append({"model": model, "role": role, "kernel": label, "tile": tile, "us": t_us, "rel_err": err})
        report["per_call"] += rows


def whole_step(model_name: str, repeats: int, report: Dict[str, Any], dev: torch.device = torch.device("cuda"),
               dtype: torch.dtype = torch.bfloat16) -> None:
    from policyinject import init_inference
    from policyinject.bench.decode import build_model, pi_measure
    from policyinject.decode.generate import Decoder
    from policyinject.modules.block import InjectedBlock

    model = build_model(model_name, dtype, dev)
    engine = init_inference(model, dtype=str(dtype).replace("torch.", ""), replace_with_kernel_inject=True,
                            enable_cuda_graph=dev.type == "cuda", max_out_tokens=512)
    blocks = [m for m in engine.module.modules() if isinstance(m, InjectedBlock)]
    ids = torch.randint(3, model.config.vocab_size, (1, 128), device=dev)
    decoders = {}
    for fuse in (False, True):  # each decoder captures its graphs with the path set at capture time
        for b in blocks:
            b.fuse_norms = fuse
        decoders[fuse] = Decoder.from_engine(engine, use_graphs=dev.type == "cuda")
        pi_measure(decoders[fuse], ids, 8, 1, dev)  # warm-up: compile and capture
    times: Dict[bool, List[float]] = {False: [], True: []}
    for _ in range(repeats):
        for fuse in (False, True):
            times[fuse].append(pi_measure(decoders[fuse], ids, 128, 3, dev)["step_s"] * 1e3)
    tokens = {fuse: d.generate(ids, max_new_tokens=64, eos_token_id=[]) for fuse, d in decoders.items()}
    captures = {fuse: d.stats.get("captures") for fuse, d in decoders.items()}
    agree = float((tokens[True][0, 128:] == tokens[False][0, 128:]).float().mean())
    first_diff = int((tokens[True][0, 128:] != tokens[False][0, 128:]).nonzero()[0, 0]) if agree < 1 else None
    row = {"model": model_name, "separate_ms": times[False], "fused_ms": times[True],
           "separate_median": statistics.median(times[False]), "fused_median": statistics.median(times[True]),
           "greedy_agreement_64": agree, "first_different_token": first_diff, "blocks": len(blocks),
           "captures": captures}
    print(f"\n{model_name}: decode ms/token, separate norms {row['separate_median']:.3f} ({times[False]}), "
          f"folded into the GEMVs {row['fused_median']:.3f} ({times[True]}); greedy agreement over 64 tokens "
          f"{agree:.2f} (first difference at {first_diff})", flush=True)
    report["whole_step"].append(row)
    del engine, decoders, model
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3, help="A/B rounds of the whole-step comparison")
    p.add_argument("--skip-calls", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/norm_fusion.py needs a CUDA GPU")
        return 2
    import triton
    import transformers

    from policyinject.testing.roofline import copy_bandwidth

    copy_tbs = copy_bandwidth(torch.device("cuda")) / 1e12
    print(f"card: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}; copy bandwidth {copy_tbs:.3f} TB/s", flush=True)
    report: Dict[str, Any] = {"card": torch.cuda.get_device_name(0), "copy_TBps": copy_tbs,
                              "torch": torch.__version__, "triton": triton.__version__, "per_call": [],
                              "whole_step": []}
    if not args.skip_calls:
        for m in args.models:
            per_call(m, copy_tbs, report)
    for m in args.models:
        whole_step(m, args.repeats, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
