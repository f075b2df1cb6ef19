"""Where a graphed decode step spends its time: per-kernel GPU time against each kernel's own roofline.

Builds a preset (random weights, bf16), injects kernels with CUDA graphs, generates once to capture, then
profiles whole ``generate`` calls with ``torch.profiler`` (kernels inside graph replays are recorded on
CUDA 12+). Kernel time is grouped by kind (decode GEMV, cuBLAS GEMM, attention, norms, ...) and divided by
the number of decode steps; for the linear kernels the bytes they must read (their weights) give a
roofline at the copy bandwidth measured in the same run.

    python benchmarks/decode_breakdown.py --preset llama-3.2-1b [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

import torch

from policyinject.testing.roofline import copy_bandwidth, weight_bytes

CATEGORIES = (
    ("decode GEMV", re.compile(r"gemv|q4mma", re.I)),
    ("int GEMV/GEMM", re.compile(r"w[48]|quant|qgemv", re.I)),
    ("cuBLAS GEMM", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|ampere_bf16|cublas", re.I)),
    ("decode attention", re.compile(r"attn|attention|flash", re.I)),
    ("norms", re.compile(r"norm", re.I)),
    ("activation", re.compile(r"swiglu|geglu|gated|silu|gelu", re.I)),
    ("rotary", re.compile(r"rotary|rope", re.I)),
    ("sampling / argmax / bookkeeping", re.compile(r"argmax|reduce|index|copy|fill|elementwise|cat|arange|where", re.I)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--quant", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode_breakdown needs a CUDA GPU", file=sys.stderr)
        return 2

    import policyinject as pi
    from policyinject.engine import parameter_bytes
    from policyinject.testing.presets import preset_model

    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    model = preset_model(args.preset, dtype=torch.bfloat16, device=device)
    extra = {}
    if args.quant != "none":
        extra["quant"] = {"enabled": True, "weight": {"num_bits": 8 if args.quant == "int8" else 4}}
    engine = pi.init_inference(model, dtype="bf16", replace_with_kernel_inject=True, enable_cuda_graph=True,
                               max_out_tokens=args.prompt + args.new + 8, **extra)
    weights = weight_bytes(model)["read_per_token"]  # an untied input embedding: one row read per step
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), device=device)
    engine.generate(ids, max_new_tokens=args.new, eos_token_id=[])  # capture + warm-up
    torch.cuda.synchronize()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof_1:
        engine.generate(ids, max_new_tokens=1, eos_token_id=[])
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof_n:
        engine.generate(ids, max_new_tokens=args.new, eos_token_id=[])
        torch.cuda.synchronize()

    def kernel_us(prof) -> dict:
        out: dict = defaultdict(float)
        for evt in prof.key_averages():
            dev = getattr(evt, "device_time_total", None)
            if dev is None:
                dev = getattr(evt, "cuda_time_total", 0.0)
            if dev and evt.device_type == torch.autograd.DeviceType.CUDA:
                out[evt.key] += dev
        return out

    k1, kn = kernel_us(prof_1), kernel_us(prof_n)
    steps = args.new - 1
    per_step = {name: (kn.get(name, 0.0) - k1.get(name, 0.0)) / steps for name in kn}
    groups: dict = defaultdict(float)
    names: dict = defaultdict(list)
    for name, us in per_step.items():
        if us <= 0:
            continue
        groups[category(name)] += us
        names[category(name)].append((us, name))
    total = sum(groups.values())
    roofline_us = weights / bw * 1e6
    linear_bytes = sum(parameter_bytes(m) for m in model.modules()
                       if hasattr(m, "in_features") and not any(True for _ in m.children()))
    print(f"{torch.cuda.get_device_name(device)} | {args.preset} | bf16 | quant {args.quant} | batch 1 | prompt "
          f"{args.prompt} | copy {bw / 1e12:.2f} TB/s | weights read per step {weights / 1e9:.3f} GB -> roofline "
          f"{roofline_us:.0f} us/token")
    print(f"{'kind':34s} {'us/step':>9} {'share':>7}")
    rows = []
    for label, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{label:34s} {us:9.1f} {us / total:7.1%}")
        top = sorted(names[label], reverse=True)[:3]
        for kus, kname in top:
            print(f"    {kus:9.1f}  {kname[:90]}")
        rows.append({"kind": label, "us_per_step": round(us, 2),
                     "top": [{"us": round(a, 2), "kernel": b} for a, b in top]})
    linear_us = groups.get("decode GEMV", 0) + groups.get("cuBLAS GEMM", 0) + groups.get("int GEMV/GEMM", 0)
    print(f"GPU kernel time per step {total:.0f} us; linears {linear_us:.0f} us reading {linear_bytes / 1e9:.3f} GB "
          f"= {linear_bytes / (linear_us * 1e-6) / 1e12 if linear_us else float('nan'):.2f} TB/s "
          f"({linear_bytes / bw * 1e6 / linear_us if linear_us else float('nan'):.0%} of copy); everything else "
          f"{total - linear_us:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "quant": args.quant, "copy_tb_s": bw / 1e12, "weights": weights,
                       "roofline_us": roofline_us, "kernel_us_per_step": total, "kinds": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
