"""Quantized matmul at large M: the Triton tl.dot kernel (``gemm``) against dequantize-to-scratch + cuBLAS
(``dequant``) and bf16 cuBLAS, on the Llama-3-8B linear shapes, to place
:data:`policyinject.kernels.quant_heuristics.DEQUANT_MIN_M`.

Run on a GPU:  python benchmarks/dequant_sweep.py [--m 16 64 128 256 512 2048]
Prints one line per (bits, shape, M) with microseconds per call (CUDA-graph replays, steady_state_seconds).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from policyinject.testing.roofline import steady_state_seconds

    from policyinject.kernels import quant_matmul as qm
    from policyinject.kernels._common import sm_count
    from policyinject.kernels.quant_heuristics import _quant_matmul_config
    from policyinject.kernels.quantize import quantize_weight

    p = argparse.ArgumentParser()
    p.add_argument("--m", nargs="+", type=int, default=[16, 64, 128, 256, 512, 2048])
    args = p.parse_args()
    dev = torch.device("cuda")
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    sms = sm_count(dev)
    print(f"{torch.cuda.get_device_name(dev)} torch {torch.__version__}")
    totals: dict = {}
    for bits in (8, 4):
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            qw = quantize_weight(w, bits)
            for m in args.m:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                tile = _quant_matmul_config(m, n, k, bits, qw.group_size, sms, False)
                y_ref = torch.nn.functional.linear(x, w)
                outs = {}
                times = {}
                for label, fn in (
                    ("bf16", lambda: torch.nn.functional.linear(x, w)),
                    ("gemm", lambda: qm.quant_matmul(x, qw, config=tile)),
                    ("dequant", lambda: qm.quant_matmul(x, qw, config={"kernel": "dequant"})),
                ):
                    outs[label] = fn()
                    times[label] = steady_state_seconds(fn, [()], device=dev) * 1e6  # graph replays: no host
                err = {k_: float((v.float() - y_ref.float()).norm() / y_ref.float().norm()) for k_, v in outs.items()}
                for k_, v in times.items():
                    totals[(bits, m, k_)] = totals.get((bits, m, k_), 0.0) + v
                print(f"int{bits} {name:>8} M={m:>5}: bf16 {times['bf16']:9.1f} us  gemm {times['gemm']:9.1f} us "
                      f"({times['gemm'] / times['bf16']:.2f}x)  dequant {times['dequant']:9.1f} us "
                      f"({times['dequant'] / times['bf16']:.2f}x)  err gemm {err['gemm']:.1e} dequant "
                      f"{err['dequant']:.1e}", flush=True)
    print("\nper layer (qkv + o + gate_up + down), us:")
    for bits in (8, 4):
        for m in args.m:
            b, g, d = (totals[(bits, m, x)] for x in ("bf16", "gemm", "dequant"))
            print(f"int{bits} M={m:>5}: bf16 {b:9.1f}  gemm {g:9.1f} ({g / b:.2f}x)  dequant {d:9.1f} ({d / b:.2f}x)")


if __name__ == "__main__":
    main()
