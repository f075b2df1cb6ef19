"""Perplexity of real models under weight quantization: unquantized vs int8 vs int4 at each group size.

Text: Debian's GPL-3 (``/usr/share/common-licenses/GPL-3``), the first 2048 tokens in 512-token windows.
Models: SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct from their PyPI packages (see docs/models in
``shared/reference/models.md``); a model whose packages are missing is skipped with the pip command. Runs on
the CPU in fp32 with the reference (PyTorch) kernels, so it measures the *format*, not the kernels.

    python benchmarks/quant_accuracy.py [--models smollm2 qwen] [--rows LABEL ...] [--json out.json]

``--rows`` runs only the rows whose label contains one of the given strings (the unquantized baseline always
runs first: every delta is against it); ``--list`` prints the row labels.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GPL3 = "/usr/share/common-licenses/GPL-3"

#: (label, quant config or None). Group sizes that do not divide a model's hidden sizes are skipped.
#: ``method``: ``rtn`` round to nearest, ``hqq`` half-quadratic zero-point search (asymmetric only; what
#: ``auto``, the default, picks for asymmetric int4); see docs/quantization.md. The "(default)" rows give only
#: the bit width; every other row spells out its type and group, so its meaning does not move with the
#: defaults (int8: symmetric, per channel; int4: asymmetric, group 32, hqq).
def _int4(q_type: str, group: int, method: str) -> tuple:
    """An explicit int4 row: ``q_type`` "sym" or "asym", the group size and the method."""
    full = {"sym": "symmetric", "asym": "asymmetric"}[q_type]
    return (f"int4 {q_type}, group {group}, {method}",
            {"weight": {"num_bits": 4, "q_type": full, "group_size": group, "method": method}})


CONFIGS = [
    ("unquantized", None),
    ("int8 sym per-channel (default)", {"weight": {"num_bits": 8}}),
    ("int8 asym per-channel", {"weight": {"num_bits": 8, "q_type": "asymmetric"}}),
    ("int4 asym, group 32, hqq (default)", {"weight": {"num_bits": 4}}),
    *(_int4("sym", g, "rtn") for g in (128, 64, 32)),
    *(_int4("asym", g, m) for g in (128, 64, 32) for m in ("rtn", "hqq")),
]


def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen"], choices=["smollm2", "qwen"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json", default="")
    parser.add_argument("--rows", nargs="+", default=[], metavar="LABEL",
                        help="run only the rows whose label contains one of these strings (plus the baseline)")
    parser.add_argument("--list", action="store_true", help="print the row labels and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(label for label, _ in CONFIGS))
        return 0
    configs = [(label, quant) for label, quant in CONFIGS
               if quant is None or not args.rows or any(r in label for r in args.rows)]

    import policyinject as pi
    from policyinject.testing import models

    torch.manual_seed(0)
    with open(GPL3, encoding="utf-8") as f:
        text = f.read()
    results = {"text": GPL3, "tokens": args.tokens, "window": 512, "torch": torch.__version__, "models": {}}
    for name in args.models:
        loader = models.load_smollm2 if name == "smollm2" else models.load_qwen25_coder
        try:
            t0 = time.perf_counter()
            base, tok = loader()
        except models.ModelNotInstalled as exc:
            print(f"{name}: skipped: {exc}")
            continue
        print(f"{name}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        ids = tok(text, return_tensors="pt").input_ids[:, :args.tokens]
        rows = []
        ref = None
        for label, quant in configs:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            try:
                if quant is not None:
                    pi.init_inference(model, dtype="fp32", kernel_backend="torch", quant={"enabled": True, **quant})
            except (pi.PlanError, pi.ConfigError) as exc:
                print(f"  {label:40s} skipped: {str(exc).splitlines()[0]}")
                continue
            t_quant = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl = perplexity(model, ids)
            ref = ppl if ref is None else ref
            delta = (ppl / ref - 1) * 100
            rows.append({"config": label, "quant": quant, "perplexity": round(ppl, 4), "delta_pct": round(delta, 3),
                         "init_s": round(t_quant, 1)})
            print(f"  {label:40s} ppl {ppl:9.4f}  {delta:+7.2f}%  (init {t_quant:.0f} s, eval "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
            del model
        results["models"][name] = rows
        del base
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
