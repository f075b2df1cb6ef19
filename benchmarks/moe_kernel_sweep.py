"""Launch parameters of the fused MoE kernels at real shapes: GPU time of ``fused_moe`` per configuration,
timed over CUDA-graph replays, against the bytes of the experts the routed tokens select at the copy rate.

Shapes: Mixtral-8x7B (H 4096, I 14336, 8 experts, top 2) and Qwen3-30B-A3B (H 2048, I 768, 128 experts,
top 8); tokens 1 (the GEMV pair) and 16 (the grouped GEMM); bf16, int8 (per channel) and int4 (group 32,
asymmetric) experts. The first row of each case is the default :func:`policyinject.kernels.moe.moe_config`.

    python benchmarks/moe_kernel_sweep.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

import torch

from policyinject.kernels.moe import MoEConfig, fused_moe, moe_config, quantize_experts, route
from policyinject.testing.roofline import copy_bandwidth, steady_state_seconds

SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}


def graph_time_us(fn: Any, device: torch.device) -> float:
    """GPU time of ``fn`` per call over CUDA-graph replays (no launch gaps)."""
    return 1e6 * steady_state_seconds(fn, [()], calls=20, device=device)


def candidates(tokens: int, hidden: int, inter: int, experts: int, k: int, bits: int) -> List[MoEConfig]:
    quantized = bits != 16
    base = moe_config(tokens, hidden, inter, top_k=k, num_experts=experts, quantized=quantized, weight_bits=bits)
    out = [base]
    if base.gemv:
        for down in (4, 8, 16, 32):
            for pairs in (False, True):
                out.append(MoEConfig(True, 1, base.block_n, 256, 4, down, pairs))
        for up in (8, 16, 32):
            out.append(MoEConfig(True, 1, up, 256, 4, base.block_n_down, base.down_per_pair))
        for bk in (128, 512):
            out.append(MoEConfig(True, 1, base.block_n, bk, 4, base.block_n_down, base.down_per_pair))
    else:
        for bm in (16, 32):
            for bn in (64, 128):
                for bk in (64, 128):
                    out.append(MoEConfig(False, bm, bn, bk, 4))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name(dev)} | copy {bw / 1e12:.2f} TB/s | torch {torch.__version__}", flush=True)
    rows: List[Dict[str, Any]] = []
    for name, (hidden, inter, experts, k) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        w2 = torch.randn(experts, hidden, inter, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        for fmt in args.formats:
            if fmt == "bf16":
                a, b = w13, w2
            else:
                bits, group, sym = (8, None, True) if fmt == "int8" else (4, 32, False)
                a, b = quantize_experts(w13, bits, group, sym), quantize_experts(w2, bits, group, sym)
            per_expert = (3 * hidden * inter) * {"bf16": 2.0, "int8": 1.0 + 2.0 / hidden, "int4": 0.5 + 4.0 / 32}[fmt]
            for t in args.tokens:
                x = torch.randn(t, hidden, device=dev, dtype=torch.bfloat16, generator=g)
                weights, ids = route(torch.randn(t, experts, device=dev, generator=g), k, normalize=True)
                distinct = int(ids.unique().numel())
                roof_us = 1e6 * distinct * per_expert / bw
                ref = fused_moe(x, a, b, ids, weights).float()
                best = None
                for i, cfg in enumerate(candidates(t, hidden, inter, experts, k, {"bf16": 16, "int8": 8, "int4": 4}[fmt])):
                    try:
                        out = fused_moe(x, a, b, ids, weights, config=cfg).float()
                        err = float((out - ref).norm() / ref.norm())
                        us = graph_time_us(lambda: fused_moe(x, a, b, ids, weights, config=cfg), dev)
                    except Exception as exc:  # a configuration that does not compile or fit: reported, skipped
                        print(f"  {name} {fmt} T={t} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                        continue
                    row = dict(shape=name, format=fmt, tokens=t, config=cfg.__dict__, default=i == 0, us=us,
                               roofline_us=roof_us, fraction=roof_us / us, rel_err_vs_default=err,
                               distinct_experts=distinct)
                    rows.append(row)
                    if i == 0:
                        print(f"{name:14s} {fmt:5s} T={t:3d} default {us:8.1f} us  roofline {roof_us:7.1f} us "
                              f"({roof_us / us:4.0%})  {cfg}", flush=True)
                    if best is None or us < best["us"]:
                        best = row
                if best is not None:
                    print(f"{'':14s} {'':5s} {'':5s} best    {best['us']:8.1f} us  ({best['fraction']:4.0%})  "
                          f"{best['config']}  err {best['rel_err_vs_default']:.1e}", flush=True)
                del x
        del w13, w2
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth": bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
