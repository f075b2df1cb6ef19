"""Perplexity and greedy-text agreement of every weight-quantization method, calibrated ones included.

Evaluation text: Debian's GPL-3 (``/usr/share/common-licenses/GPL-3``), the first 2048 tokens in 512-token
windows. Calibration text (``--calibration``): ``shipped``, the package's default
(``policyinject/quant/data/calibration.txt``, this project's own documentation and code: out of domain), or
``heldout``, the same license text's tokens after the evaluated 2048 (in domain, disjoint tokens). Either way the
calibration tokens are not the evaluation tokens; ``licenses`` adds the other license texts Debian ships
(GPL-2, LGPL-2.1, GFDL-1.3, MPL-2.0, Apache-2.0, ...) up to ``--max-rows`` rows of 512 tokens. Greedy agreement: the share of
32 greedily generated tokens (after each of two fixed prompts) equal, position by position, to the unquantized
model's. CPU, fp32, reference (PyTorch) kernels: it measures the format and the rounding, not the kernels.

    python benchmarks/quant_calibrated.py --models smollm2 --json out.json [--rows gptq awq]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_accuracy import GPL3, perplexity  # noqa: E402

#: In-domain calibration besides the held-out GPL-3 tokens (``--calibration licenses``): other license texts
#: that Debian ships next to it (none of them is the evaluated text).
OTHER_LICENSES = ("GPL-2", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "LGPL-2", "GPL-1")

PROMPTS = ("The GNU General Public License is", "def fibonacci(n):\n    ")


def rows() -> list:
    out = [("unquantized", None)]
    for bits, groups in ((4, (32, 128)), (8, (None,))):
        for g in groups:
            for m in ("rtn", "hqq", "gptq", "awq"):
                if bits == 8 and m == "hqq":
                    continue
                w = {"num_bits": bits, "method": m}
                if bits == 4:
                    w.update(q_type="asymmetric", group_size=g)
                label = f"int{bits} {'asym g' + str(g) if g else 'sym per-channel'} {m}"
                out.append((label, w))
    return out


def greedy(model, tok, new_tokens: int = 32) -> list:
    outs = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            outs.append(model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:].tolist())
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "qwen"])
    ap.add_argument("--rows", nargs="+", default=[])
    ap.add_argument("--calibration", choices=["shipped", "heldout", "licenses"], default="shipped",
                    help="shipped: the package's default text (out of domain); heldout: the evaluation text's tokens "
                         "after the evaluated 2048, in 512-token rows (same text, disjoint tokens); licenses: "
                         "heldout plus the system's other license texts (in domain, more tokens; --max-rows)")
    ap.add_argument("--max-rows", type=int, default=32, help="calibration rows of 512 tokens for 'licenses'")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import transformers

    import policyinject as pi
    from policyinject.testing import models

    text = open(GPL3, encoding="utf-8").read()
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "models": {}}
    for name in args.models:
        base, tok = models.load_smollm2() if name == "smollm2" else models.load_qwen25_coder()
        all_ids = tok(text, return_tensors="pt").input_ids
        ids = all_ids[:, :2048]
        calibration = {"tokenizer": tok}
        if args.calibration in ("heldout", "licenses"):
            held = all_ids[0, 2048:]
            rows_ = [held[i:i + 512] for i in range(0, held.numel() - 511, 512)]
            if args.calibration == "licenses":
                for other in OTHER_LICENSES:
                    path = os.path.join(os.path.dirname(GPL3), other)
                    if os.path.exists(path):
                        ids_o = tok(open(path, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
                        rows_ += [ids_o[i:i + 512] for i in range(0, ids_o.numel() - 511, 512)]
                rows_ = rows_[:args.max_rows]
            calibration = {"data": rows_, "num_samples": len(rows_), "seq_len": 512}
            result["calibration_tokens"] = 512 * len(rows_)
        result["calibration"] = args.calibration
        ref_ppl, ref_gen, table = None, None, []
        result["models"][name] = table
        for label, w in rows():
            if w is not None and args.rows and not any(r in label for r in args.rows):
                continue
            model = copy.deepcopy(base) if w is not None else base
            t0 = time.perf_counter()
            c0 = time.process_time()
            if w is not None:
                try:
                    pi.init_inference(model, dtype="fp32", kernel_backend="torch",
                                      quant={"enabled": True, "weight": w, "calibration": calibration})
                except (pi.PlanError, pi.ConfigError) as exc:  # e.g. group 128 does not divide SmolLM2's 576
                    print(f"{label}: skipped: {str(exc).splitlines()[0][:160]}", flush=True)
                    continue
            init_s, init_cpu = time.perf_counter() - t0, time.process_time() - c0
            ppl = perplexity(model, ids)
            gen = greedy(model, tok)
            if ref_ppl is None:
                ref_ppl, ref_gen = ppl, gen
            agree = sum(a == b for g, r in zip(gen, ref_gen) for a, b in zip(g, r)) / sum(len(r) for r in ref_gen)
            row = {"config": label, "perplexity": round(ppl, 4), "delta_pct": round((ppl / ref_ppl - 1) * 100, 2),
                   "greedy_agreement": round(agree, 3), "init_s": round(init_s, 1), "init_cpu_s": round(init_cpu, 1)}
            table.append(row)
            print(json.dumps(row), flush=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            if w is not None:
                del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
