"""Wall time of calibrated int4 quantization (GPTQ, AWQ) of a Llama-3-8B-shaped model on one GPU.

Random weights with the real shapes (bf16), calibration rows of random token ids (the default 8 x 512), the
whole ``init_inference`` call timed (calibration forward passes + the method's search + rounding), one process.
Weights do not change the cost of either method, only what they learn, so random weights time them honestly.

    python benchmarks/quant_calibrate_gpu.py --preset llama-3-8b --methods gptq awq --json out.json
    python benchmarks/quant_calibrate_gpu.py --preset tiny:llama --device cpu --methods gptq   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=["gptq", "awq", "hqq", "rtn"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import policyinject as pi
    from policyinject.testing import presets

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "preset": args.preset,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "num_samples": args.num_samples, "seq_len": args.seq_len, "group_size": args.group_size, "rows": []}
    for method in args.methods:
        if args.preset.startswith("tiny:"):
            model = presets.tiny_model(args.preset[5:], dtype=dtype, device=device)
        else:
            model = presets.preset_model(args.preset, dtype=dtype, device=device)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, vocab, (args.seq_len,), generator=gen) for _ in range(args.num_samples)]
        layers = getattr(model.config, "num_hidden_layers", 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pi.init_inference(model, dtype="bf16" if device.type == "cuda" else "fp32", quant={"enabled": True, "weight": {
            "num_bits": 4, "q_type": "asymmetric", "group_size": args.group_size, "method": method},
            "calibration": {"data": rows, "num_samples": args.num_samples, "seq_len": args.seq_len}})
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        row = {"method": method, "layers": layers, "seconds": round(seconds, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
