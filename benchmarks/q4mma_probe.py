"""Launch-config sweep of the tensor-core int4 decode GEMV (``q4mma``, batch 1, bf16) on the Llama shapes.

For int4 asymmetric group 32 (the default) and symmetric group 128: each shape's heuristic pick (whatever
``quant_matmul_config`` chooses, the CUDA-core word kernel included) and every ``q4mma`` tile / K split,
each checked against dequantize-then-matmul and timed per call inside a CUDA graph over rotating weight sets
(``policyinject.testing.roofline.steady_state_seconds``), with the fraction of the measured copy bandwidth. Ends
with the per-token sum (32 layers + int4 head) for the heuristic and for the best config per shape.

    python benchmarks/q4mma_probe.py        # a CUDA GPU; about 1.5 minutes on an H100
"""
import torch
from policyinject.kernels.quantize import quantize_weight, dequantize_weight
from policyinject.kernels.quant_matmul import quant_matmul, quant_matmul_config
from policyinject.kernels.gemv import pick_split_k
from policyinject.testing.roofline import steady_state_seconds, copy_bandwidth

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
sm = props.multi_processor_count
bw = copy_bandwidth(dev)
print(f"card {props.name}, copy {bw/1e12:.3f} TB/s", flush=True)
torch.manual_seed(0)

def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096), "1B-o": (2048, 2048), "1B-down": (2048, 8192)}
L2 = 50 << 20
tot = {}
for fmt, (g, sym) in {"g32asym": (32, False), "g128sym": (128, True)}.items():
    for name, (n, k) in SHAPES.items():
        qw = quantize_weight(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, 4, g, symmetric=sym)
        nb = qw.nbytes()
        sets_n = max(2, min(8, -(-2 * L2 // nb)))
        qws = [qw] + [quantize_weight(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, 4, g, symmetric=sym) for _ in range(sets_n - 1)]
        xs = [torch.randn(1, k, device=dev, dtype=torch.bfloat16) for _ in qws]
        ref = xs[0].float() @ dequantize_weight(qw).T
        t_old = steady_state_seconds(lambda x, q: quant_matmul(x, q), list(zip(xs, qws)))
        res = [f"old {t_old*1e6:6.1f}us {nb/t_old/bw*100:3.0f}%"]
        best = None
        for bn in (16, 32, 64):
            for nq in (2, 4, 8):
                for warps in (4,):
                    tpw_r = 32 // (4 * min(nq, 8))
                    if k % (nq * 128) or (bn // 2) < tpw_r * warps:
                        continue
                    sk0 = pick_split_k(-(-n // bn), k // (nq * 128), sm)
                    for sk in sorted({1, sk0}):
                        if (k // (nq * 128)) % sk:
                            continue
                        cfg = {"kernel": "q4mma", "BN": bn, "NQ": nq, "split_k": sk, "num_warps": warps}
                        e = rel(quant_matmul(xs[0], qw, config=cfg), ref)
                        if not e < 2e-2:
                            res.append(f"{bn}/{nq}/{warps}w/{sk} BAD {e:.2g}")
                            continue
                        t = steady_state_seconds(lambda x, q: quant_matmul(x, q, config=cfg), list(zip(xs, qws)))
                        res.append(f"{bn}/{nq}/{warps}w/{sk} {t*1e6:5.1f}")
                        if best is None or t < best[0]:
                            best = (t, cfg)
        cfg_h = quant_matmul_config(1, n, k, 4, g)
        t_h = steady_state_seconds(lambda x, q: quant_matmul(x, q), list(zip(xs, qws)))
        res.insert(0, f"heuristic {cfg_h} {t_h*1e6:5.1f}us")
        mult = 0 if name.startswith("1B") else (32 if name != "lm_head" else 1)
        tot.setdefault(fmt, [0.0, 0.0])
        tot[fmt][0] += mult * t_old
        tot[fmt][1] += mult * (best[0] if best else t_old)
        print(f"{fmt} {name:8s} {n}x{k} {nb/1e6:.1f}MB best {best[1] if best else None} | " + " | ".join(res), flush=True)
        del qws, xs
        torch.cuda.empty_cache()
for fmt, (a, b) in tot.items():
    print(f"{fmt}: per-token matmuls (32 layers + int4 head) old {a*1e3:.3f} ms, q4mma best {b*1e3:.3f} ms")
