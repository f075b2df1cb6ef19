"""Time RTN vs HQQ int4 quantization of the Llama-3-8B layer linears (random weights, real shapes) on one GPU."""
import os, sys, time, types, torch
# import the two kernel modules without the package __init__ (the GPU box may lack the config dependencies)
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "policyinject")
for name, path in (("policyinject", root), ("policyinject.kernels", os.path.join(root, "kernels"))):
    mod = types.ModuleType(name); mod.__path__ = [path]; sys.modules.setdefault(name, mod)
from policyinject.kernels.quantize import quantize_weight
from policyinject.kernels.quant_search import hqq_quantize_weight
dev = "cuda"
shapes = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
ws = {k: (torch.randn(*s, device=dev, dtype=torch.bfloat16) * 0.02) for k, s in shapes.items()}
def layer(fn):
    torch.cuda.synchronize(); t = time.perf_counter()
    for w in ws.values(): fn(w)
    torch.cuda.synchronize(); return time.perf_counter() - t
for name, fn in [("rtn sym", lambda w: quantize_weight(w, 4, 128, True)),
                 ("rtn asym", lambda w: quantize_weight(w, 4, 128, False)),
                 ("hqq sym", lambda w: hqq_quantize_weight(w, 4, 128, True)),
                 ("hqq asym", lambda w: hqq_quantize_weight(w, 4, 128, False))]:
    layer(fn)
    ts = [layer(fn) for _ in range(3)]
    print(f"{name:9s} one 8B layer {min(ts)*1e3:7.1f} ms -> 32 layers {min(ts)*32:6.2f} s; peak mem {torch.cuda.max_memory_allocated()/2**30:.2f} GiB", flush=True)
print(torch.cuda.get_device_name(), torch.__version__)
