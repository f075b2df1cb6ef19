"""Where time to first token goes: a whole ``generate(max_new_tokens=1)`` call against the prefill alone
(graphed, bucketed), the same prefill eagerly, and the unpadded eager prefill, per preset and prompt length.

    python benchmarks/ttft_breakdown.py --preset llama-3.2-1b llama-3-8b --prompt 128 2048 [--quant 8 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    from policyinject import init_inference
    from policyinject.decode.generate import Decoder
    from policyinject.testing.presets import preset_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--prompt", nargs="+", type=int, default=[128, 2048])
    ap.add_argument("--quant", nargs="*", type=int, default=[], help="also int8 / int4 weights (8B only)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)} torch {torch.__version__}", flush=True)
    for spec in args.preset:
        for bits in [None] + (args.quant if spec == "llama-3-8b" else []):
            model = preset_model(spec, dtype=torch.bfloat16, device=dev)
            quant = {} if bits is None else {"quant": {"enabled": True, "weight": {"num_bits": bits}}}
            engine = init_inference(model, dtype="bf16", replace_with_kernel_inject=True, enable_cuda_graph=True,
                                    max_out_tokens=max(args.prompt) + 8, **quant)
            graphed = engine._get_decoder()
            eager = Decoder.from_engine(engine, use_graphs=False)
            plain = Decoder.from_engine(engine, use_graphs=False)
            plain.prefill_buckets = False
            vocab = model.config.vocab_size
            for p in args.prompt:
                ids = torch.randint(3, vocab, (1, p), device=dev)
                mask = torch.ones_like(ids)
                with torch.inference_mode():
                    row = {}
                    for name, fn in (("generate(new=1)", lambda: graphed.generate(ids, max_new_tokens=1,
                                                                                  eos_token_id=[])),
                                     ("prefill graphed", lambda: graphed.prefill(ids, mask)),
                                     ("prefill eager (bucketed)", lambda: eager.prefill(ids, mask)),
                                     ("prefill eager (unpadded)", lambda: plain.prefill(ids, mask))):
                        fn()
                        fn()
                        row[name] = _median_ms(fn)
                    same = torch.equal(graphed.prefill(ids, mask), eager.prefill(ids, mask))
                label = f"{spec}{'' if bits is None else f' int{bits}'} prompt {p}"
                print(f"{label:>28}: " + "  ".join(f"{k} {v:7.2f} ms" for k, v in row.items())
                      + f"  graphed==eager logits: {same}", flush=True)
            del engine, model, graphed, eager, plain
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
