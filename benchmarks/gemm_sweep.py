"""Prefill GEMM sweep: the quantized ``tl.dot`` kernel's tiles against cuBLAS bf16 on the Llama-3-8B shapes.

For int4 (asymmetric group 32, the default; symmetric group 128) and int8 per channel, at ``M`` = 128 and 512
activation rows: the heuristic's config and every tile of a small grid, each checked against
dequantize-then-matmul on fresh inputs, then timed per call in a CUDA graph
(``policyinject.testing.roofline.steady_state_seconds``). Prints per shape the best configs and the heuristic next
to cuBLAS on the bf16 weight.

    python benchmarks/gemm_sweep.py [--m 128 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMATS = {"int4-g32-asym": (4, 32, False), "int4-g128-sym": (4, 128, True), "int8": (8, None, True)}


def tiles(bits: int, group: int, k: int):
    for bm, bn, bk, (warps, stages) in itertools.product((64, 128), (64, 128, 256), (64, 128, 256),
                                                        ((4, 3), (8, 3), (8, 4))):
        if bm * bn > 128 * 128 and warps == 4:
            continue
        if bits == 4 and group and bk % group and group % bk:
            continue
        yield {"kernel": "gemm", "BM": bm, "BN": bn, "BK": bk, "split_k": 1, "num_warps": warps,
               "num_stages": stages}


def small_m_tiles(m: int, n: int, k: int, bits: int, group: int):
    """Batched-decode tiles (M <= 64): BM = next power of two of M (at least 16), BN 64-256, BK 128/256, split K
    chosen as the heuristic does (the grid covers the SMs about twice)."""
    from policyinject.kernels._common import cdiv, next_pow2
    from policyinject.kernels.gemv import pick_split_k

    bm = max(16, next_pow2(m))
    for bn, bk, (warps, stages) in itertools.product((64, 128, 256), (128, 256), ((4, 4), (8, 4), (4, 6))):
        if bits == 4 and group and bk % group and group % bk:
            continue
        split = pick_split_k(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), 132)
        yield {"kernel": "gemm", "BM": bm, "BN": bn, "BK": bk, "split_k": split, "num_warps": warps,
               "num_stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--heuristic-only", action="store_true", help="time only the heuristic's config")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from policyinject.kernels.quant_matmul import quant_matmul, quant_matmul_config
    from policyinject.kernels.quant_reference import quant_matmul_reference
    from policyinject.kernels.quantize import quantize_weight
    from policyinject.testing.roofline import steady_state_seconds

    if not torch.cuda.is_available():
        print("benchmarks/gemm_sweep.py needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name(dev)}; bf16 activations", flush=True)
    rows, t0 = [], time.time()

    def us(fn) -> float:
        return steady_state_seconds(fn, [()], device=dev) * 1e6

    for role in args.shapes:
        n, k = SHAPES[role]
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        for m in args.m:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            cub = us(lambda: torch.nn.functional.linear(x, w))
            print(f"\n{role} {n}x{k} M={m}: cuBLAS bf16 {cub:.1f} us", flush=True)
            for fmt in args.formats:
                bits, group, sym = FORMATS[fmt]
                qw = quantize_weight(w, bits, group, symmetric=sym)
                ref = quant_matmul_reference(x.float(), qw)
                heur = quant_matmul_config(m, n, k, bits, qw.group_size)
                found = []
                pick = small_m_tiles(m, n, k, bits, group or k) if m <= 64 else tiles(bits, group or k, k)
                grid = [] if args.heuristic_only else [("tile", c) for c in pick]
                for name, cfg in [("heuristic", heur)] + grid:
                    try:
                        out = quant_matmul(x, qw, backend="triton", config=cfg)
                        err = float((out.float() - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            print(f"  {fmt} WRONG {err:.2e} {json.dumps(cfg)}")
                            continue
                        t = us(lambda cfg=cfg: quant_matmul(x, qw, backend="triton", config=cfg))
                    except Exception as exc:  # a tile the compiler rejects (shared memory): skip it
                        print(f"  {fmt} ERROR {repr(exc)[:120]} {json.dumps(cfg)}")
                        continue
                    found.append((t, name, cfg))
                    rows.append({"role": role, "m": m, "format": fmt, "name": name, "config": cfg, "us": t,
                                 "cublas_us": cub, "rel_err": err})
                found.sort(key=lambda r: r[0])
                h = next(r for r in found if r[1] == "heuristic")
                print(f"  {fmt:14s} heuristic {h[0]:8.1f} us ({h[0] / cub:.1f}x cuBLAS)  best {found[0][0]:8.1f} us "
                      f"({found[0][0] / cub:.1f}x) {json.dumps(found[0][2])}")
                for t, name, cfg in found[1:4]:
                    print(f"  {'':14s} {t:8.1f} us {json.dumps(cfg)}")
    print(f"\nsweep time {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
