"""Decode attention per launch, old one-program-per-KV-head kernel vs split-KV variants (H100, bf16).

16 "layers" (own caches, q/k/v, rotary fused) captured in one CUDA graph after an L2 flush (256 MB zero_,
as the step's weight stream evicts the KV cache between layers); per launch = (graph - flush-only graph) / 16,
median of 30 replays. Each variant is first checked against a float64 reference (relative error by norm,
NaN-poisoned output). Run from the repository root: python benchmarks/results/h100-attn-bench.py

Runs 1 and 2 (logs h100-attn-1/2-attn_bench.log) used earlier versions of this script with switches that no
longer exist (fused combine, masked loads, num_stages); S=1 then meant one split of the split kernel, now it is
the one-program kernel (the "old" one).
"""
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

from policyinject.decode.attention import decode_attention, decode_attention_reference, split_plan

spec = importlib.util.spec_from_file_location("oldk", Path(__file__).with_name("h100-attn-old_kernel.py"))
oldk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(oldk)


def old_attention(q, k, v, kc, vc, cp, kv, span, cos, sin):
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    q3, k3, v3 = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    cos2, sin2 = cos.reshape(b, -1), sin.reshape(b, -1)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    m = kv.view(torch.uint8)
    oldk.decode_attention_kernel[(b * hkv,)](
        q3, k3, v3, kc, vc, m, cp, out, cos2, sin2,
        q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), m.stride(0), out.stride(0), out.stride(1), cos2.stride(0),
        d ** -0.5, 0, span, HKV=hkv, G=hq // hkv, G_PAD=16, D=d, D_PAD=max(16, d), BLOCK_S=64, HAS_WINDOW=False,
        DOT_PREC=None if q.dtype != torch.float32 else "ieee", R=cos2.shape[-1], INTERLEAVED=False)
    return out[:, :, None]


def run(b, hq, hkv, d, span, positions, variants, layers=16):
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 smoke test, no timing
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g).to(  # noqa: E731
        torch.bfloat16 if dev == "cuda" else torch.float32)
    L = [dict(q=rnd(b, hq, 1, d), k=rnd(b, hkv, 1, d), v=rnd(b, hkv, 1, d), kc=rnd(b, hkv, span, d),
              vc=rnd(b, hkv, span, d)) for _ in range(layers)]
    ang = torch.rand(b, 1, d, device=dev, generator=g) * 6
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    kv = torch.ones(b, span, dtype=torch.bool, device=dev)
    cp = torch.tensor([positions[0]], device=dev)
    flush = torch.empty(64 * 2**20 if dev == "cuda" else 1, dtype=torch.float32, device=dev)
    rows = []
    for name, fn in variants:
        call = lambda x: fn(x["q"], x["k"], x["v"], x["kc"], x["vc"], cp, kv, span, cos, sin)  # noqa: E731
        # correctness at each position (float64 reference over [0, pos])
        errs = []
        for pos in positions:
            cp.fill_(pos)
            x = L[0]
            kc0, vc0 = x["kc"].clone(), x["vc"].clone()
            out = call(x)
            ref = decode_attention_reference(x["q"].double(), x["k"].double(), x["v"].double(), kc0.double(),
                                             vc0.double(), cp, kv, span=pos + 1, cos=cos.double(),
                                             sin=sin.double(), rotary="half")
            o = out.double()
            errs.append(float("nan") if o.isnan().any() else ((o - ref).norm() / ref.norm()).item())
        if dev == "cpu":
            rows.append((name, -1, 0.0, 0.0, max(errs)))
            continue
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in L:
                call(x)
        torch.cuda.current_stream().wait_stream(side)
        graphs = {}
        for mode in ("flush", "cold", "hot"):
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                if mode != "hot":
                    flush.zero_()
                if mode != "flush":
                    for x in L:
                        call(x)
            graphs[mode] = gr
        for pos in positions:
            cp.fill_(pos)
            t = {}
            for mode, gr in graphs.items():
                for _ in range(3):
                    gr.replay()
                ts = []
                for _ in range(30):
                    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    gr.replay()
                    e.record()
                    e.synchronize()
                    ts.append(a.elapsed_time(e) * 1e3)
                t[mode] = statistics.median(ts)
            cold = (t["cold"] - t["flush"]) / layers
            hot = t["hot"] / layers
            rows.append((name, pos, cold, hot, max(errs)))
    return rows


def main():
    cuda = torch.cuda.is_available()
    print(torch.cuda.get_device_name(0) if cuda else "cpu", "sms",
          torch.cuda.get_device_properties(0).multi_processor_count if cuda else "-")
    for label, b, d, positions in [] if not cuda else [("1B", 1, 64, (128, 192, 255)), ("8B", 1, 128, (128, 192, 255)),
                                   ("1B b8", 8, 64, (128, 255)), ("8B b32", 32, 128, (128, 255))]:
        span = 256
        hq, hkv = 32, 8
        plan = split_plan(b, hkv, span, torch.device("cuda"))
        bench(label, b, hq, hkv, d, span, positions, plan)
    if not cuda:  # smoke test of the script under the interpreter
        bench("smoke", 1, 4, 2, 16, 64, (20, 63), (4, 16), layers=2)
    return 0


def bench(label, b, hq, hkv, d, span, positions, plan, layers=16):
    if True:
        variants = [("old", old_attention)]

        def mk(s, bs):
            return lambda q, k, v, kc, vc, cp, kv, span, cos, sin: decode_attention(
                q, k, v, kc, vc, cp, kv, span, cos=cos, sin=sin, rotary="half", num_splits=s, block_s=bs,
                backend="triton")
        combos = [plan] + ([(8, 16), (16, 32), (32, 16)] if b == 1 else [(1, 64), (2, 64), (4, 32)])
        seen = set()
        for combo in combos:
            if combo in seen:
                continue
            seen.add(combo)
            variants.append((f"S={combo[0]} B={combo[1]}" + (" (plan)" if combo == plan else ""), mk(*combo)))
        print(f"\n== {label}: b {b}, hq {hq}, hkv {hkv}, d {d}, span {span}, plan {plan}")
        print(f"{'variant':26s} {'pos':>4} {'cold us':>8} {'hot us':>8} {'max rel err':>11}")
        for name, pos, cold, hot, err in run(b, hq, hkv, d, span, positions, variants, layers):
            print(f"{name:26s} {pos:4d} {cold:8.2f} {hot:8.2f} {err:11.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
