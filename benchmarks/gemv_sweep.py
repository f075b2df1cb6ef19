"""Batch-1 decode GEMV sweep: bf16, int8 and int4 kernels and their launch configs on the Llama shapes.

Every config is checked against the reference on fresh inputs, then timed per call inside one CUDA graph over
rotating weight sets (more bytes than L2), as in a graph-captured decode step (``policyinject.testing.roofline``'s
steady-state timing; session-2 runs 1-2 used ``do_bench`` on the graph replay, which adds one L2 flush per
replay of 2 x sets calls). Prints, per shape, the best
configs of each kernel and the fraction of the measured copy bandwidth (weight bytes), then the per-token sum
(32 layers + bf16 head for the 8B) for the heuristic and for the best config of each method.

    python benchmarks/gemv_sweep.py [--models 8B 1B] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

SHAPES = {
    "8B": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
           "lm_head": (128256, 4096)},
    "1B": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
           "lm_head": (128256, 2048)},
}
LAYERS = {"8B": 32, "1B": 16}


def candidates(method: str, n: int, k: int, sm: int):
    """(name, config) pairs for one method; the heuristic first."""
    from policyinject.kernels.gemv import gemv_config, pick_split_k
    from policyinject.kernels.quant_matmul import quant_matmul_config

    out = []
    if method == "bf16":
        h = gemv_config(1, n, k, 2, sm)
        out.append(("heuristic", h))
        for bn, bk, w in [(1, 2048, 8), (4, 1024, 4)]:
            if bk <= k:
                out.append(("cfg", {"BM": 1, "BN": bn, "BK": bk, "split_k": 1, "num_warps": w}))
    elif method == "int8":
        out.append(("heuristic", quant_matmul_config(1, n, k, 8, k, sm)))
        out.append(("byte", {"kernel": "gemv", "BM": 1, "BN": 4, "GPB": 1, "GK": 1024, "split_k": 1, "num_warps": 4}))
        out.append(("q8-compiler", {"kernel": "q8gemv", "BM": 1, "BN": 4, "BK": 1024, "VEC": 8, "split_k": 1,
                                    "num_warps": 4, "asm": False}))  # byte conversion left to the compiler
        for bk, vec in ((1024, 8), (1024, 16)):
            out.append(("q8-vacc", {"kernel": "q8gemv", "BM": 1, "BN": 4, "BK": bk, "VEC": vec, "split_k": 1,
                                    "num_warps": 4, "acc_vec": True}))  # one accumulator per weight register
        for bn in (1, 2, 4, 8):
            for bk, vec in ((1024, 8), (2048, 8), (1024, 16), (2048, 16), (4096, 16), (4096, 32)):
                for w in (1, 2, 4, 8):
                    if k % bk or bn * bk // vec < 32 * w:
                        continue
                    cfg = {"kernel": "q8gemv", "BM": 1, "BN": bn, "BK": bk, "VEC": vec, "split_k": 1,
                           "num_warps": w, "acc_vec": False}
                    out.append(("q8", cfg))
                    sk = pick_split_k(-(-n // bn), k // bk, sm)
                    if sk > 1:
                        out.append(("q8-split", dict(cfg, split_k=sk)))
    else:  # int4, group 128
        out.append(("heuristic", quant_matmul_config(1, n, k, 4, 128, sm)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["8B", "1B"], choices=list(SHAPES))
    ap.add_argument("--roles", nargs="+", default=None, help="only these shapes (qkv o gate_up down lm_head)")
    ap.add_argument("--methods", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"],
                    help="kernel families to sweep (cuBLAS and the bf16 heuristic are always timed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    import triton

    from policyinject.kernels.gemv import gemv
    from policyinject.kernels.quant_matmul import quant_matmul
    from policyinject.kernels.quant_reference import quant_matmul_reference
    from policyinject.kernels.quantize import quantize_weight
    from policyinject.testing.roofline import copy_bandwidth, steady_state_seconds

    if not torch.cuda.is_available():
        print("benchmarks/gemv_sweep.py needs a CUDA GPU")
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    sm = props.multi_processor_count
    copy_tbs = copy_bandwidth(dev) / 1e12
    print(f"card: {props.name}, {sm} SMs; torch {torch.__version__}, triton {triton.__version__}; bf16 activations")
    print(f"copy bandwidth (1 GiB, read + write): {copy_tbs:.3f} TB/s", flush=True)
    report = {"card": props.name, "copy_TBps": copy_tbs, "torch": torch.__version__, "triton": triton.__version__,
              "rows": []}
    l2 = 50 * 2**20

    def graph_us(calls) -> float:
        """Microseconds per call of the rotating ``calls``, back to back in one CUDA graph (policyinject.testing.roofline)."""
        return steady_state_seconds(lambda i: calls[i](), [(i,) for i in range(len(calls))],
                                    calls=2 * len(calls), device=dev) * 1e6

    def rel_err(a, b) -> float:
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")

    best = {}
    t0 = time.time()
    for model in args.models:
        for role, (n, k) in SHAPES[model].items():
            if args.roles and role not in args.roles:
                continue
            count = max(2, min(16, math.ceil(4 * l2 / (n * k))))
            ws = [(torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16) for _ in range(count)]
            qs = {"int8": [quantize_weight(w, 8, None) for w in ws], "int4": [quantize_weight(w, 4, 128) for w in ws]}
            xs = [torch.randn(1, k, device=dev).to(torch.bfloat16) for _ in range(count)]
            cub = graph_us([lambda i=i: torch.nn.functional.linear(xs[i], ws[i]) for i in range(count)])
            bytes_bf16 = n * k * 2
            print(f"\n{model} {role} {n}x{k}: cuBLAS {cub:.1f} us ({bytes_bf16 / cub / 1e6 / copy_tbs:.0%} of copy)",
                  flush=True)
            report["rows"].append({"model": model, "role": role, "method": "cublas", "us": cub})
            for method in ("bf16", "int8", "int4"):
                if method not in args.methods and method != "bf16":
                    continue
                rows = []
                cands = candidates(method, n, k, sm)
                if method not in args.methods:
                    cands = cands[:1]  # the bf16 heuristic: the per-token baseline
                for name, cfg in cands:
                    try:
                        x0 = torch.randn(1, k, device=dev).to(torch.bfloat16)
                        if method == "bf16":
                            out = gemv(x0, ws[0], backend="triton", config=cfg)
                            ref = x0.float() @ ws[0].float().t()
                            fn = lambda i, cfg=cfg: gemv(xs[i], ws[i], backend="triton", config=cfg)
                            nbytes = bytes_bf16
                        else:
                            out = quant_matmul(x0, qs[method][0], backend="triton", config=cfg)
                            ref = quant_matmul_reference(x0.float(), qs[method][0])
                            fn = lambda i, cfg=cfg, m=method: quant_matmul(xs[i], qs[m][i], backend="triton", config=cfg)
                            nbytes = qs[method][0].nbytes()
                        err = rel_err(out.float(), ref.float())
                        us = graph_us([lambda i=i, fn=fn: fn(i) for i in range(count)])
                    except Exception as exc:  # a config the compiler rejects: report it and go on
                        print(f"  {method:5s} {name:12s} ERROR {repr(exc)[:160]} {json.dumps(cfg)}")
                        report["rows"].append({"model": model, "role": role, "method": method, "name": name,
                                               "config": cfg, "error": repr(exc)[:300]})
                        continue
                    frac = nbytes / us / 1e6 / copy_tbs
                    ok = err < 1e-2
                    rec = {"model": model, "role": role, "method": method, "name": name, "config": cfg, "us": us,
                           "frac_copy": frac, "rel_err": err, "ok": ok}
                    report["rows"].append(rec)
                    rows.append(rec)
                rows.sort(key=lambda r: r["us"] if r["ok"] else float("inf"))
                heur = next((r for r in rows if r["name"] == "heuristic"), None)
                for r in rows[:5]:
                    print(f"  {method:5s} {r['us']:7.1f} us {r['frac_copy']:6.1%} err {r['rel_err']:.1e} "
                          f"{r['name']:12s} {json.dumps(r['config'])}")
                bad = [r for r in rows if not r["ok"]]
                for r in bad:
                    print(f"  {method:5s} WRONG err {r['rel_err']:.1e} {r['name']} {json.dumps(r['config'])}")
                if heur:
                    print(f"  {method:5s} heuristic {heur['us']:.1f} us ({heur['frac_copy']:.1%})", flush=True)
                best[(model, role, method)] = (heur["us"] if heur else float("nan"), rows[0]["us"] if rows else float("nan"),
                                               rows[0]["config"] if rows else None)
                best[(model, role, "cublas")] = (cub, cub, None)
            if role == "gate_up":  # SwiGLU in the GEMV epilogue vs GEMV then the activation kernel
                from policyinject.kernels.activations import gated_act
                from policyinject.kernels.gemv import gemv_gated
                from policyinject.kernels.quant_matmul import quant_gated_matmul

                pairs = {"bf16": (lambda i: gated_act(gemv(xs[i], ws[i], backend="triton"), "silu"),
                                  lambda i: gemv_gated(xs[i], ws[i], backend="triton"))}
                if "int8" in args.methods:
                    pairs["int8"] = (lambda i: gated_act(quant_matmul(xs[i], qs["int8"][i], backend="triton"), "silu"),
                                     lambda i: quant_gated_matmul(xs[i], qs["int8"][i], "silu"))
                for method, (two, one) in pairs.items():
                    err = rel_err(one(0).float(), two(0).float())
                    t2 = graph_us([lambda i=i: two(i) for i in range(count)])
                    t1 = graph_us([lambda i=i: one(i) for i in range(count)])
                    print(f"  {method:5s} gate|up + SwiGLU: GEMV then activation {t2:.1f} us, fused {t1:.1f} us "
                          f"(err {err:.1e})", flush=True)
                    report["rows"].append({"model": model, "role": role, "method": method, "name": "gated",
                                           "unfused_us": t2, "fused_us": t1, "rel_err": err})
            del ws, qs, xs
            torch.cuda.empty_cache()
        if args.roles:
            continue  # a partial sweep has no per-token sum
        print(f"\n{model} per token (x{LAYERS[model]} layers + bf16 head, GEMV-best head):")
        roles = [r for r in SHAPES[model] if r != "lm_head"]
        head_h, head_b, _ = best[(model, "lm_head", "bf16")]
        tot = {}
        for method in ("cublas", "bf16", "int8", "int4"):
            if method not in args.methods and method not in ("cublas", "bf16"):
                continue
            h = sum(best[(model, r, method)][0] for r in roles) * LAYERS[model] + head_h
            b = sum(best[(model, r, method)][1] for r in roles) * LAYERS[model] + head_b
            tot[method] = (h, b)
        for method, (h, b) in tot.items():
            print(f"  {method:6s} heuristic {h / 1e3:.3f} ms  best {b / 1e3:.3f} ms  "
                  f"(best vs bf16 best {tot['bf16'][1] / b:.2f}x)")
        report[f"per_token_{model}"] = {m: {"heuristic_us": h, "best_us": b} for m, (h, b) in tot.items()}
    report["best"] = [{"model": k[0], "role": k[1], "method": k[2], "heuristic_us": v[0], "best_us": v[1],
                       "config": v[2]} for k, v in best.items()]
    print(f"\nsweep time {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
