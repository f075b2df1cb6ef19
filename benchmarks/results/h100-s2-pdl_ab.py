# Kept as a record of session-2 run 5 (the PDL wiring it measured was removed after this A/B; see NOTES).
"""A/B of programmatic dependent launch in the graphed decode step: the same injected model, one decoder
captured with the GEMVs launched with PDL and one without, timed alternately in one process.

    python benchmarks/pdl_ab.py [--preset llama-3.2-1b llama-3-8b] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=["llama-3.2-1b", "llama-3-8b"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    import decode as bench
    from policyinject.decode.generate import Decoder
    from policyinject.kernels.pdl import pdl_supported
    from policyinject.modules.fast_linear import DecodeLinear

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}; PDL supported: {pdl_supported(dev)}; bf16, batch 1, "
          f"prompt {args.prompt}, {args.new} new tokens", flush=True)
    out = {}
    for preset in args.preset:
        model = bench.build_model(preset, torch.bfloat16, dev)
        engine = bench.pi_engine(model, "graphs", "bf16", max(256, args.prompt + args.new))
        linears = [m for m in model.modules() if isinstance(m, DecodeLinear)]
        ids = torch.randint(3, model.config.vocab_size, (1, args.prompt), device=dev)
        decoders, times = {}, {True: [], False: []}
        for pdl in (False, True):
            for m in linears:
                m.pdl = pdl
            decoders[pdl] = Decoder.from_engine(engine, use_graphs=True)
            bench.pi_measure(decoders[pdl], ids, args.new, 1, dev)  # capture with this setting
        tokens = {p: decoders[p].generate(ids, max_new_tokens=16, eos_token_id=[]) for p in (False, True)}
        for _ in range(args.rounds):
            for pdl in (False, True):
                times[pdl].append(bench.pi_measure(decoders[pdl], ids, args.new, 3, dev)["step_s"] * 1e3)
        same = bool(torch.equal(tokens[False], tokens[True]))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"{preset}: without PDL {off:.3f} ms/token {times[False]}, with PDL {on:.3f} ms/token {times[True]}; "
              f"{(off - on) * 1e3:+.1f} us/token; same greedy tokens: {same}", flush=True)
        out[preset] = {"off_ms": times[False], "on_ms": times[True], "same_tokens": same}
        del engine, model, decoders
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
