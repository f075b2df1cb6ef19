#!/usr/bin/env python
"""Decode matmul benchmark: cuBLAS bf16 vs our bf16 GEMV vs int8 (w8a16) vs int4 (w4a16, group 128).

Usage (on a CUDA machine; about 2-3 minutes, ``--quick`` well under one):

    python benchmarks/quant.py [--quick] [--json out.json] [--no-sweep] [--no-graph]

What it does, in one process:

1. prints the card, torch and triton versions; measures device-to-device copy bandwidth (bytes read + written);
2. for Llama-3-8B and Llama-3.2-1B decode weights (fused qkv, o, fused gate_up, down, lm_head) at batch 1, 4
   and 16: checks every method against a float32 reference on fresh random inputs (relative error by norm),
   then times it: one call per rotating weight set (enough sets that together they exceed L2), twice over,
   captured in one CUDA graph (no Python or launch overhead, as in a graph-captured decode step), replayed
   under ``triton.testing.do_bench`` (median, L2 flushed between replays), divided by the number of calls:
   time, bytes, TB/s, fraction of copy bandwidth, speedup vs cuBLAS;
3. batch 1, 8B shapes: a small sweep of alternative launch configs per kernel (best config reported, for
   tuning the heuristics);
4. the per-token estimate for the 8B model: (qkv + o + gate_up + down) x 32 layers + lm_head (bf16), bf16 vs
   int8 vs int4, with the targets (int8 >= 1.6x, int4 >= 2.2x the bf16 speed);
5. the same sequence measured: 32 distinct layers' weights, every matmul of one decode step captured in one
   CUDA graph and replayed;
6. a compact table last.

``--smoke`` runs the script's logic on the CPU under the Triton interpreter with tiny shapes (for CI of the
script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES_8B = {  # role: (N = out_features, K = in_features)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
SHAPES_1B = {
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (16384, 2048),
    "down": (2048, 8192),
    "lm_head": (128256, 2048),
}
SHAPES_SMOKE = {"qkv": (96, 64), "o": (64, 64), "gate_up": (128, 64), "down": (64, 192), "lm_head": (160, 64)}
LAYERS_8B = 32
METHODS = ("cublas", "gemv", "int8", "int4")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8B shapes, batch 1 only, no sweep, no graph")
    ap.add_argument("--json", type=str, default=None, help="write every number to this JSON file")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweep")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode-step measurement")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (logic check)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which optional parts are skipped")
    ap.add_argument("--tune", action="store_true",
                    help="only the tuning sweeps: int4 word-kernel configs (8B and 1B shapes, batch 1 and 4) and "
                         "bf16 GEMV configs (1B shapes, batch 1), each against the current heuristic")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    from policyinject.kernels.gemv import gemv
    from policyinject.kernels.quant_matmul import quant_matmul, quant_matmul_config
    from policyinject.kernels.quant_reference import quant_matmul_reference
    from policyinject.kernels.quantize import quantize_weight

    t_start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/quant.py needs a CUDA GPU (use --smoke for a CPU logic check)")
        return 2
    dtype = torch.float16 if args.smoke else torch.bfloat16
    report: dict = {"env": {}, "kernels": [], "sweep": [], "per_token": {}, "graph": {}}

    # ------------------------------------------------------------------ environment and copy bandwidth
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        card = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        card = "CPU (smoke run: Triton interpreter, numbers are meaningless)"
    env = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "dtype": str(dtype)}
    report["env"] = env
    print(f"card: {card}\ntorch {torch.__version__}, triton {triton.__version__}, activations {dtype}")

    def bench(fn, warmup=10, rep=40) -> float:
        """Median milliseconds per call of ``fn`` (do_bench: CUDA events, L2 flushed before each call)."""
        if args.smoke:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def bench_calls(calls, rounds: int = 2) -> float:
        """Median milliseconds per call of a sequence of calls (one per rotating weight set, ``rounds`` times),
        captured in one CUDA graph: no Python or launch overhead in the number, as in a graph-captured decode
        step. Eager and timed per call under --smoke."""
        if args.smoke:
            return bench(calls[0])
        seq = list(calls) * rounds
        for c in seq:
            c()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in seq:
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in seq:
                c()
        ms = bench(graph.replay, warmup=5, rep=40) / len(seq)
        del graph
        return ms

    if device == "cuda":
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        src.random_(0, 255)
        ms = bench(lambda: dst.copy_(src), warmup=20, rep=200)
        copy_tbs = 2 * src.numel() / (ms * 1e-3) / 1e12
        del src, dst
    else:
        copy_tbs = 1.0
    env["copy_TBps"] = copy_tbs
    print(f"device-to-device copy: {copy_tbs:.2f} TB/s (read + write); the roofline below\n")

    def rel_err(out, ref) -> float:
        o, r = out.double(), ref.double()
        if not torch.isfinite(o).all():
            return float("inf")
        return float((o - r).norm() / r.norm())

    def make_sets(n, k, count):
        sets = []
        for _ in range(count):
            w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
            sets.append({
                "w": w,
                "int8": quantize_weight(w, 8, None),
                "int4": quantize_weight(w, 4, 32 if args.smoke else 128),
            })
        return sets

    def run(method, x, s, config=None):
        if method == "cublas":
            return torch.nn.functional.linear(x, s["w"])
        if method == "gemv":
            return gemv(x, s["w"], backend="triton", config=config)
        return quant_matmul(x, s[method], backend="triton", config=config)

    def weight_bytes(method, s):
        if method in ("cublas", "gemv"):
            return s["w"].numel() * s["w"].element_size()
        return s[method].nbytes()

    if args.tune:
        tune(args, report, make_sets, run, weight_bytes, bench_calls, rel_err, copy_tbs, device, dtype,
             quant_matmul_reference)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
        return 0

    model_sets = [("8B", SHAPES_SMOKE if args.smoke else SHAPES_8B)]
    if not args.quick and not args.smoke:
        model_sets.append(("1B", SHAPES_1B))
    batches = (1,) if args.quick else ((1, 16) if args.smoke else (1, 4, 16))
    times: dict = {}
    failures: list = []
    l2_bytes = 50 * 2**20
    for model_name, shapes in model_sets:
        for role, (n, k) in shapes.items():
            bf16_bytes = n * k * 2
            count = 1 if args.smoke else max(2, min(16, math.ceil(4 * l2_bytes / (n * k))))  # int4 sets > L2 too
            sets = make_sets(n, k, count)
            for m in batches:
                xs = [torch.randn(m, k, device=device).to(dtype) for _ in range(count)]
                # correctness first, on fresh inputs and the first weight set
                x0 = torch.randn(m, k, device=device).to(dtype)
                s0 = sets[0]
                ref16 = (x0.float() @ s0["w"].float().t())
                errs = {}
                for method in METHODS:
                    if method == "gemv" and m > 16:
                        continue
                    out = run(method, x0, s0)
                    ref = ref16 if method in ("cublas", "gemv") else quant_matmul_reference(x0, s0[method])
                    errs[method] = rel_err(out.float(), ref.float())
                    if not errs[method] < 1e-2:
                        failures.append(f"{model_name} {role} M={m} {method}: rel err {errs[method]:.2e}")
                del ref16
                for method in METHODS:
                    ms = bench_calls([lambda i=i, method=method: run(method, xs[i], sets[i]) for i in range(count)])
                    nbytes = weight_bytes(method, s0) + (m * k + m * n) * 2
                    tbs = nbytes / (ms * 1e-3) / 1e12
                    rec = {"model": model_name, "role": role, "N": n, "K": k, "M": m, "method": method,
                           "ms": ms, "bytes": nbytes, "TBps": tbs, "frac_copy": tbs / copy_tbs,
                           "rel_err": errs.get(method)}
                    if method in ("int8", "int4"):
                        rec["config"] = quant_matmul_config(
                            m, n, k, 8 if method == "int8" else 4, s0[method].group_size,
                            torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132,
                            interpret=args.smoke)
                    report["kernels"].append(rec)
                    times[(model_name, role, m, method)] = ms
                base = times[(model_name, role, m, "cublas")]
                for method in METHODS:
                    for rec in report["kernels"][-len(METHODS):]:
                        if rec["method"] == method:
                            rec["speedup_vs_cublas"] = base / rec["ms"]
                print(f"{model_name} {role:8s} {n:6d}x{k:<6d} M={m:<3d} " + "  ".join(
                    f"{meth} {times[(model_name, role, m, meth)] * 1e3:8.1f}us" for meth in METHODS)
                    + f"  (bf16 {bf16_bytes / 1e6:.0f} MB, {count} sets)")
            del sets
            if device == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ config sweep (batch 1, 8B shapes)
    sm = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    if not args.quick and not args.no_sweep:
        print("\nconfig sweep, batch 1 (8B shapes):")
        shapes = SHAPES_SMOKE if args.smoke else SHAPES_8B
        for role, (n, k) in shapes.items():
            if time.perf_counter() - t_start > args.budget * 0.65:
                print("  (sweep stopped: time budget)")
                break
            count = 1 if args.smoke else max(2, min(16, math.ceil(4 * l2_bytes / (n * k))))
            sets = make_sets(n, k, count)
            xs = [torch.randn(1, k, device=device).to(dtype) for _ in range(count)]
            variants = {
                "gemv": [{"BM": 1, "BN": bn, "BK": bk, "split_k": 1, "num_warps": w}
                         for bn, bk, w in [(2, 1024, 4), (4, 512, 4), (16, 256, 4), (8, 1024, 8)]],
                "int8": [{"kernel": "gemv", "BM": 1, "BN": bn, "GPB": 1, "GK": gk, "split_k": 1, "num_warps": w}
                         for bn, gk, w in [(8, 512, 4), (8, 1024, 8), (16, 256, 4), (2, 2048, 4)]],
                "int4": [{"kernel": "gemv", "BM": 1, "BN": bn, "GPB": gpb, "GK": 128, "split_k": 1, "num_warps": w}
                         for bn, gpb, w in [(8, 8, 4), (16, 4, 4), (8, 16, 8), (32, 2, 4)]],
            }
            for method, cfgs in variants.items():
                best = None
                for cfg in cfgs:
                    if args.smoke:
                        cfg = dict(cfg, **({"BK": 64} if method == "gemv" else {"GK": 32, "GPB": 2}))
                    try:
                        x0 = torch.randn(1, k, device=device).to(dtype)
                        out = run(method, x0, sets[0], cfg)
                        ref = (x0.float() @ sets[0]["w"].float().t()) if method == "gemv" else \
                            quant_matmul_reference(x0, sets[0][method])
                        err = rel_err(out.float(), ref.float())
                        ms = bench_calls([lambda i=i, method=method, cfg=cfg: run(method, xs[i], sets[i], cfg)
                                          for i in range(count)])
                    except Exception as exc:  # a config the compiler rejects: report and go on
                        report["sweep"].append({"role": role, "method": method, "config": cfg, "error": repr(exc)[:200]})
                        continue
                    tbs = weight_bytes(method, sets[0]) / (ms * 1e-3) / 1e12
                    report["sweep"].append({"role": role, "method": method, "config": cfg, "ms": ms, "TBps": tbs,
                                            "rel_err": err})
                    if err < 1e-2 and (best is None or ms < best[0]):
                        best = (ms, cfg, tbs)
                heur = times.get(("8B", role, 1, method))
                if best is not None:
                    print(f"  {role:8s} {method:5s} heuristic {heur * 1e3:8.1f}us   best {best[0] * 1e3:8.1f}us "
                          f"({best[2]:.2f} TB/s) {json.dumps(best[1])}")
            del sets
            if device == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ per-token estimate (8B)
    layer_roles = ("qkv", "o", "gate_up", "down")
    est = {}
    for method in METHODS:
        layer = sum(times[("8B", r, 1, method)] for r in layer_roles)
        est[method] = layer * LAYERS_8B
    head_cublas = times[("8B", "lm_head", 1, "cublas")]
    head_best = min(head_cublas, times[("8B", "lm_head", 1, "gemv")])
    per_token = {
        "bf16 cuBLAS": est["cublas"] + head_cublas,
        "bf16 GEMV": est["gemv"] + head_best,
        "int8": est["int8"] + head_best,
        "int4": est["int4"] + head_best,
    }
    report["per_token"] = {"ms": per_token, "head_ms_bf16": head_best, "layers": LAYERS_8B}
    base = per_token["bf16 cuBLAS"]
    print("\nLlama-3-8B decode matmuls per token (sum of kernel medians; bf16 head):")
    weights_8b = sum(n * k for n, k in SHAPES_8B.values())
    for name, ms in per_token.items():
        print(f"  {name:12s} {ms:7.3f} ms/token   {base / ms:5.2f}x vs bf16 cuBLAS")

    # ------------------------------------------------------------------ measured decode step in a CUDA graph
    graph_ms = {}
    if device == "cuda" and not args.quick and not args.no_graph and time.perf_counter() - t_start < args.budget:
        try:
            graph_ms = measure_graph(torch, quantize_weight, gemv, quant_matmul, dtype, bench,
                                     head_gemv=head_best < head_cublas)
        except Exception as exc:  # report and carry on to the table
            print(f"graph measurement failed: {exc!r}")
        report["graph"] = graph_ms

    # ------------------------------------------------------------------ compact table
    print("\n" + "=" * 100)
    print(f"{card} | torch {torch.__version__} | triton {triton.__version__} | copy {copy_tbs:.2f} TB/s | "
          f"activations {dtype}, rotating weights, per-call median inside CUDA graphs")
    print(f"{'model role':18s} {'N x K':>13s} {'M':>3s} | " + " | ".join(f"{m:>22s}" for m in METHODS))
    for model_name, shapes in model_sets:
        for role, (n, k) in shapes.items():
            for m in batches:
                cells = []
                for method in METHODS:
                    rec = next(r for r in report["kernels"] if (r["model"], r["role"], r["M"], r["method"])
                               == (model_name, role, m, method))
                    cells.append(f"{rec['ms'] * 1e3:7.1f}us {rec['frac_copy'] * 100:3.0f}% {rec['speedup_vs_cublas']:4.2f}x")
                print(f"{model_name + ' ' + role:18s} {f'{n}x{k}':>13s} {m:3d} | " + " | ".join(f"{c:>22s}" for c in cells))
    print("cells: median time, fraction of copy bandwidth (weight bytes), speedup vs cuBLAS bf16")
    roof = weights_8b * 2 / (copy_tbs * 1e12) * 1e3
    print(f"8B per token (32 layers + bf16 head; bf16 roofline {roof:.2f} ms): " + ", ".join(
        f"{k} {v:.3f} ms ({base / v:.2f}x)" for k, v in per_token.items()))
    t8, t4 = base / per_token["int8"], base / per_token["int4"]
    print(f"targets vs bf16 cuBLAS: int8 {t8:.2f}x (>= 1.6: {'PASS' if t8 >= 1.6 else 'FAIL'}), "
          f"int4 {t4:.2f}x (>= 2.2: {'PASS' if t4 >= 2.2 else 'FAIL'})")
    if graph_ms:
        gb = graph_ms.get("bf16 cuBLAS")
        print("8B decode-step matmuls in one CUDA graph (32 distinct layers + bf16 head): " + ", ".join(
            f"{k} {v:.3f} ms ({gb / v:.2f}x)" for k, v in graph_ms.items()))
    if failures:
        print("CORRECTNESS FAILURES: " + "; ".join(failures))
    else:
        print("correctness: every method within 1e-2 relative error (by norm) of its float32 reference")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if failures else 0


def tune(args, report, make_sets, run, weight_bytes, bench_calls, rel_err, copy_tbs, device, dtype, qref) -> None:
    """Config sweeps for the decode kernels (``--tune``): every config checked on fresh inputs, then timed
    per call inside a CUDA graph over rotating weight sets; the heuristic's pick is the first row."""
    import torch

    from policyinject.kernels.gemv import gemv_config, pick_split_k
    from policyinject.kernels.quant_heuristics import _byte_gemv_config, quant_matmul_config

    sm = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    l2_bytes = 50 * 2**20
    report["tune"] = []
    summary = []

    def sweep(label, method, n, k, m, cfgs, sets, count):
        xs = [torch.randn(m, k, device=device).to(dtype) for _ in range(count)]
        rows = []
        for name, cfg in cfgs:
            try:
                x0 = torch.randn(m, k, device=device).to(dtype)
                out = run(method, x0, sets[0], cfg)
                ref = (x0.float() @ sets[0]["w"].float().t()) if method == "gemv" else qref(x0, sets[0][method])
                err = rel_err(out.float(), ref.float())
                ms = bench_calls([lambda i=i, cfg=cfg: run(method, xs[i], sets[i], cfg) for i in range(count)])
            except Exception as exc:  # a config the compiler rejects: report and go on
                report["tune"].append({"label": label, "M": m, "name": name, "config": cfg, "error": repr(exc)[:300]})
                print(f"  {label} M={m} {name}: ERROR {repr(exc)[:200]}")
                continue
            tbs = weight_bytes(method, sets[0]) / (ms * 1e-3) / 1e12
            rec = {"label": label, "M": m, "name": name, "config": cfg, "us": ms * 1e3, "TBps": tbs,
                   "frac_copy": tbs / copy_tbs, "rel_err": err, "ok": err < 1e-2}
            report["tune"].append(rec)
            rows.append(rec)
        rows.sort(key=lambda r: r["us"] if r["ok"] else float("inf"))
        heur = next((r for r in rows if r["name"] == "heuristic"), None)
        for r in rows[:4]:
            print(f"  {label:14s} M={m} {r['us']:8.1f}us {r['frac_copy'] * 100:5.1f}% err {r['rel_err']:.1e} "
                  f"{r['name']:10s} {json.dumps(r['config'])}")
        if heur is not None:
            print(f"  {label:14s} M={m} heuristic {heur['us']:.1f}us ({heur['frac_copy'] * 100:.1f}%)")
        if rows:
            summary.append((label, m, heur["us"] if heur else float("nan"), rows[0]["us"], rows[0]["frac_copy"],
                            rows[0]["name"], rows[0]["config"]))

    shapes = [("8B " + r, SHAPES_8B[r]) for r in ("qkv", "o", "gate_up", "down")]
    shapes += [("1B " + r, SHAPES_1B[r]) for r in ("qkv", "o", "gate_up", "down")]
    if args.smoke:
        shapes = [("smoke " + r, SHAPES_SMOKE[r]) for r in ("qkv", "down")]
    print("\nint4 (group 128) decode GEMV sweep:")
    for label, (n, k) in shapes:
        count = 1 if args.smoke else max(2, min(16, math.ceil(4 * l2_bytes / (n * k))))
        sets = make_sets(n, k, count)
        g = sets[0]["int4"].group_size
        for m in ((1,) if args.smoke else (1, 4)):
            cfgs = [("heuristic", quant_matmul_config(m, n, k, 4, g, sm, args.smoke)),
                    ("byte", _byte_gemv_config(m, n, k, g, sm, args.smoke))]
            gk = 32 if args.smoke else 128
            grid = ([(4, 2, False, 4), (2, 2, True, 4)] if args.smoke else
                    [(bn, gpb, False, w) for bn, gpb, w in [(16, 8, 4), (8, 8, 4), (32, 4, 4), (16, 4, 4),
                                                           (32, 8, 8), (64, 2, 4), (16, 8, 8)]]
                    + [(bn, gpb, True, w) for bn, gpb, w in [(4, 8, 4), (8, 8, 4), (8, 16, 4), (16, 8, 4),
                                                            (4, 16, 4), (8, 8, 8)]])
            if m > 1:
                grid = grid[:3] + [c for c in grid if c[2]][:2]
            for bn, gpb, wl, w in grid:
                if k % (gpb * gk):
                    continue
                steps = k // (gpb * gk)
                for sk in sorted({1, pick_split_k(-(-n // bn), steps, sm)}):
                    cfgs.append((f"word{int(wl)}", {"kernel": "q4gemv", "BM": 1 << (m - 1).bit_length(), "BN": bn,
                                                     "GPB": gpb, "GK": gk, "split_k": sk, "num_warps": w,
                                                     "word_loads": wl}))
            sweep(label, "int4", n, k, m, cfgs, sets, count)
        del sets
        if device == "cuda":
            torch.cuda.empty_cache()

    print("\nbf16 GEMV sweep (1B shapes, batch 1):")
    gshapes = [("1B " + r, SHAPES_1B[r]) for r in SHAPES_1B] if not args.smoke else [("smoke o", SHAPES_SMOKE["o"])]
    for label, (n, k) in gshapes:
        count = 1 if args.smoke else max(2, min(16, math.ceil(4 * l2_bytes / (n * k * 2))))
        sets = make_sets(n, k, count)
        cfgs = [("heuristic", gemv_config(1, n, k, 2, sm))]
        combos = [(1, 1024), (2, 1024), (4, 512), (8, 512), (4, 1024), (16, 256), (2, 2048), (8, 256)]
        if args.smoke:
            combos = [(2, 64)]
        for bn, bk in combos:
            if bk > k:
                continue
            for sk in (1, 2, 4):
                if (k // bk) % sk or k // bk // sk < 1:
                    continue
                for w in (4, 8):
                    if w == 8 and bn * bk < 4096:
                        continue
                    cfgs.append(("cfg", {"BM": 1, "BN": bn, "BK": bk, "split_k": sk, "num_warps": w}))
        sweep(label, "gemv", n, k, 1, cfgs, sets, count)
        del sets
        if device == "cuda":
            torch.cuda.empty_cache()

    print("\n" + "=" * 100)
    print(f"tuning summary (copy {copy_tbs:.2f} TB/s; per call inside CUDA graphs, rotating weights)")
    for label, m, hus, bus, frac, name, cfg in summary:
        print(f"{label:14s} M={m}  heuristic {hus:8.1f}us  best {bus:8.1f}us {frac * 100:5.1f}%  {name} {json.dumps(cfg)}")


def measure_graph(torch, quantize_weight, gemv, quant_matmul, dtype, bench, head_gemv: bool) -> dict:
    """One decode step's matmuls (32 distinct layers + head), captured in a CUDA graph per method."""
    dev = "cuda"
    k_of = {r: SHAPES_8B[r][1] for r in SHAPES_8B}
    layers = []
    for _ in range(LAYERS_8B):
        layer = {}
        for role in ("qkv", "o", "gate_up", "down"):
            n, k = SHAPES_8B[role]
            layer[role] = (torch.randn(n, k, device=dev, dtype=dtype) * 0.02)
        layers.append(layer)
    n, k = SHAPES_8B["lm_head"]
    head = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
    xs = {r: torch.randn(1, k_of[r], device=dev, dtype=dtype) for r in SHAPES_8B}
    head_best_gemv = head_gemv
    fns = {}

    def step_bf16(linear):
        def step():
            for layer in layers:
                for role, w in layer.items():
                    linear(xs[role], w)
            linear(xs["lm_head"], head)
        return step

    fns["bf16 cuBLAS"] = step_bf16(lambda x, w: torch.nn.functional.linear(x, w))
    fns["bf16 GEMV"] = step_bf16(lambda x, w: gemv(x, w, backend="triton"))
    results = {}
    for bits in (8, 4):
        q = [{role: quantize_weight(w, bits, None if bits == 8 else 128) for role, w in layer.items()}
             for layer in layers]

        def step(q=q):
            for layer in q:
                for role, qw in layer.items():
                    quant_matmul(xs[role], qw, backend="triton")
            (gemv(xs["lm_head"], head, backend="triton") if head_best_gemv
             else torch.nn.functional.linear(xs["lm_head"], head))
        fns[f"int{bits}"] = step
        results[f"int{bits}"] = q
    out = {}
    for name, step in fns.items():
        step()  # compile / warm up outside the graph
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        out[name] = bench(g.replay, warmup=5, rep=100)
        del g
    print("\nmeasured, one CUDA graph per decode step (32 layers + head): " + ", ".join(
        f"{k} {v:.3f} ms" for k, v in out.items()))
    del layers, head, results
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    sys.exit(main())
