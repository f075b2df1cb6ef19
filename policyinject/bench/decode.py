"""Decode benchmark: Hugging Face eager, Hugging Face static cache + torch.compile, and policyinject configs,
in one process on one GPU, with the memory-bandwidth roofline measured in the same run.

For each model (a preset with random weights -- ``llama-3.2-1b``, ``llama-3-8b`` -- or a local checkpoint
folder) and each system:

- ``ms/token`` at every batch: decode time per step, ``(T(new=N) - T(new=1)) / (N - 1)`` for policyinject
  (no host synchronisation per token, so the difference of two whole calls); for Hugging Face, from
  per-token timestamps taken by a stopping criterion (Hugging Face's loop synchronises every token anyway);
- ``tok/s``: decode throughput, ``batch / (ms/token)``;
- ``prefill ms``: time to the first token (prompt of ``--prompt`` tokens, at each batch);
- ``ttft``: time to the first token at batch 1 for each ``--ttft`` prompt length (default 128 and 2048),
  against its floor ``max(2 * layer params * prompt / matmul rate, bytes read / copy bandwidth)``, the bf16
  matmul rate measured at start (:mod:`policyinject.bench.metrics`);
- per batch: the roofline of the weight bytes plus the KV-cache bytes a step reads, and the fraction reached;
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` while that system was built and ran;
- ``roofline``: all weight bytes (as stored: int8/int4 count as such; the definition of
  ``policyinject.testing.roofline.weight_bytes``) / the copy bandwidth measured at start (bytes read + written by a large
  device-to-device copy), and the fraction of it reached at batch 1;
- ``read roofline``: the same with the bytes a decode step actually reads: an untied input embedding, of
  which a step reads one row, left out (Llama-3-8B: 1.05 GB, 0.35 ms at 3 TB/s). The plain roofline flatters
  configurations whose other weights are small (quantized ones): judge those by this one.

The output: a compact table on the terminal (printed last), ``--json`` with every number, ``--plot`` a PNG
with one panel per metric.
Budget: ``--budget-s`` (default 400 s) -- a system that would start after the budget is skipped and marked
so. torch.compile of Hugging Face's static-cache generate recompiles per batch size (a minute or more per
shape), so it runs at ``--hf-compile-batches`` only (default: batch 1).

Needs the ``bench`` extra (``pip install 'policyinject[bench]'``: transformers, and matplotlib for ``--plot``).

Run:  policyinject bench --preset llama-3.2-1b llama-3-8b --json decode.json --plot decode.png
      (or ``python benchmarks/decode.py ...`` from a checkout)
CPU smoke test (tiny model, no graphs, no compile):
      policyinject bench --preset tiny:llama --device cpu --configs hf-eager kernels --prompt 8 --new 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from policyinject.testing.roofline import copy_bandwidth, weight_bytes

from .._extras import require
from .metrics import kv_bytes_per_step, layer_params, matmul_rate, plot_panels, ttft_roofline_s

ALL_CONFIGS = ("hf-eager", "hf-compile", "kernels", "graphs", "int8", "int4", "int8-head", "int4-head", "int4-g128",
               "int4-g128-head")
#: policyinject config of each system (merged over dtype, max_out_tokens).
PI_CONFIGS: Dict[str, dict] = {
    "kernels": dict(replace_with_kernel_inject=True, enable_cuda_graph=False),
    "graphs": dict(replace_with_kernel_inject=True, enable_cuda_graph=True),
    "int8": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                 quant={"enabled": True, "weight": {"num_bits": 8}}),
    "int4": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                 quant={"enabled": True, "weight": {"num_bits": 4}}),
    # the output head quantized too (quant.lm_head.enabled; by default it stays 16-bit)
    "int8-head": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                      quant={"enabled": True, "weight": {"num_bits": 8}, "lm_head": {"enabled": True}}),
    "int4-head": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                      quant={"enabled": True, "weight": {"num_bits": 4}, "lm_head": {"enabled": True}}),
    # int4 symmetric group 128 (the int4 default before 2026-11-26; fewer bytes, less accurate)
    "int4-g128": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                      quant={"enabled": True, "weight": {"num_bits": 4, "q_type": "symmetric", "group_size": 128}}),
    "int4-g128-head": dict(replace_with_kernel_inject=True, enable_cuda_graph=True,
                           quant={"enabled": True, "weight": {"num_bits": 4, "q_type": "symmetric", "group_size": 128},
                                  "lm_head": {"enabled": True}}),
}
LABELS = {"hf-eager": "HF eager", "hf-compile": "HF static+compile", "kernels": "pi kernels",
          "graphs": "pi kernels+graphs", "int8": "pi +int8", "int4": "pi +int4", "int8-head": "pi +int8 +head",
          "int4-head": "pi +int4 +head", "int4-g128": "pi +int4 g128 sym", "int4-g128-head": "pi +int4 g128 sym +head"}


# ------------------------------------------------------------------------------------------------ helpers
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``policyinject bench``)."""
    parser.add_argument("--preset", nargs="+", default=["llama-3.2-1b", "llama-3-8b"],
                        help="presets (llama-3.2-1b, llama-3-8b, smollm2-135m, tiny:ARCH) or checkpoint folders")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--ttft", nargs="*", type=int, default=[128, 2048],
                        help="prompt lengths at which time to first token is measured (batch 1)")
    parser.add_argument("--new", type=int, default=128, help="new tokens")
    parser.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS), choices=ALL_CONFIGS)
    parser.add_argument("--hf-compile-batches", nargs="*", type=int, default=[1],
                        help="batches at which HF static cache + torch.compile runs (recompiles per batch)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="skip systems that would start later")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke test")
    parser.add_argument("--json", dest="json_path", help="write every number here")
    parser.add_argument("--plot", dest="plot_path", help="write a PNG plot here (needs matplotlib)")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(spec: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A preset with random weights, a tiny architecture (``tiny:llama``) or a local checkpoint folder."""
    from policyinject.testing import presets

    if spec.startswith("tiny:"):
        model = presets.tiny_model(spec[5:], dtype=dtype, device=device)
    elif spec in presets.SHAPES:
        model = presets.preset_model(spec, dtype=dtype, device=device)
    elif os.path.isdir(spec):
        import transformers

        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        except TypeError:  # older transformers spell it torch_dtype
            model = transformers.AutoModelForCausalLM.from_pretrained(spec, torch_dtype=dtype)
        model = model.to(device).eval()
    else:
        known = ", ".join(list(presets.SHAPES) + ["tiny:ARCH", "a checkpoint folder"])
        raise SystemExit(f"unknown model {spec!r}; use one of: {known}")
    gc_ = getattr(model, "generation_config", None)
    if gc_ is not None:  # fixed-length generation for every system: no early EOS on random weights
        gc_.eos_token_id = None
        gc_.pad_token_id = 0
    return model


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- Hugging Face
class _Stamps:
    """A stopping criterion that records a timestamp at every generated token (never stops)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: List[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_measure(model: torch.nn.Module, ids: torch.Tensor, new: int, repeats: int, device: torch.device,
               **generate_kwargs: Any) -> Dict[str, float]:
    """Prefill (to the first token) and per-token decode time of ``model.generate``; median of ``repeats``."""
    from transformers import StoppingCriteriaList

    prefills, steps = [], []
    for _ in range(max(repeats, 1)):
        stamps = _Stamps(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, stopping_criteria=StoppingCriteriaList([stamps]), **generate_kwargs)
        sync(device)
        t = stamps.times
        prefills.append(t[0] - t0)
        steps.append((t[-1] - t[0]) / max(len(t) - 1, 1))
    return {"prefill_s": statistics.median(prefills), "step_s": statistics.median(steps)}


def hf_tokens(model: torch.nn.Module, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


# ------------------------------------------------------------------------------------------ policyinject
def pi_engine(model: torch.nn.Module, name: str, dtype: str, max_len: int) -> Any:
    from policyinject import init_inference

    return init_inference(model, dtype=dtype, max_out_tokens=max_len, **PI_CONFIGS[name])


def pi_decoder(engine: Any, use_graphs: bool) -> Any:
    decoder = engine._get_decoder() if hasattr(engine, "_get_decoder") else None
    if decoder is not None and decoder.use_graphs == use_graphs:
        return decoder
    from policyinject.decode.generate import Decoder

    return Decoder.from_engine(engine, use_graphs=use_graphs)


def pi_ttft(decoder: Any, ids: torch.Tensor, repeats: int, device: torch.device) -> float:
    """Time to the first token of a ``[1, T]`` prompt: a whole ``generate`` call with one new token, after
    two warm-up calls (the first allocates the cache, the second captures the prefill graph)."""
    run1 = lambda: decoder.generate(ids, max_new_tokens=1, eos_token_id=[])  # noqa: E731
    run1()
    run1()
    return median_time(run1, max(repeats, 3), device)


def pi_measure(decoder: Any, ids: torch.Tensor, new: int, repeats: int, device: torch.device) -> Dict[str, float]:
    """Prefill = a call with one new token; step = (call with ``new`` tokens - prefill) / (new - 1)."""
    run1 = lambda: decoder.generate(ids, max_new_tokens=1, eos_token_id=[])  # noqa: E731
    runn = lambda: decoder.generate(ids, max_new_tokens=new, eos_token_id=[])  # noqa: E731
    run1()
    runn()  # warm-up: Triton compilation, graph capture
    t1 = median_time(run1, repeats, device)
    tn = median_time(runn, repeats, device)
    return {"prefill_s": t1, "step_s": max(tn - t1, 0.0) / max(new - 1, 1)}


# ---------------------------------------------------------------------------------------------- driver
def bench_preset(spec: str, args: argparse.Namespace, device: torch.device, bandwidth: float,
                 started: float, log: Callable[[str], None]) -> Dict[str, Any]:
    dtype = _DTYPES[args.dtype]
    max_len = max(256, args.prompt + args.new, max(args.ttft or [0]) + 1)
    gen = torch.Generator().manual_seed(0)
    out: Dict[str, Any] = {"systems": {}}
    configs = [c for c in ALL_CONFIGS if c in args.configs]
    if device.type != "cuda":
        configs = [c for c in configs if c in ("hf-eager", "kernels")]
    reference_tokens = None

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_s

    def prompts(batch: int, vocab: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, args.prompt), generator=gen).to(device)

    def record(system: str, batch: int, m: Dict[str, float]) -> None:
        row = out["systems"].setdefault(system, {"batches": {}})
        row["batches"][str(batch)] = {
            "ms_per_token": round(m["step_s"] * 1e3, 4),
            "tokens_per_s": round(batch / m["step_s"], 1) if m["step_s"] > 0 else None,
            "prefill_ms": round(m["prefill_s"] * 1e3, 3),
        }
        log(f"  {spec} {LABELS[system]:>18} batch {batch:>3}: {m['step_s'] * 1e3:8.3f} ms/token, "
            f"prefill {m['prefill_s'] * 1e3:8.2f} ms")

    def start_system(system: str) -> bool:
        if over_budget():
            out["systems"][system] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            log(f"  {spec} {LABELS[system]}: skipped (budget)")
            return False
        free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return True

    def peak(system: str) -> None:
        if device.type == "cuda" and system in out["systems"]:
            out["systems"][system]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    # Hugging Face: one model, eager then static cache + compile
    hf_systems = [c for c in configs if c.startswith("hf-")]
    if hf_systems:
        t0 = time.perf_counter()
        model = build_model(spec, dtype, device)
        out["build_s"] = round(time.perf_counter() - t0, 1)
        vocab = model.config.vocab_size
        out["weights"] = weight_bytes(model)
        out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        out["layer_params"] = layer_params(model)
        out["model_config"] = model.config
        if "hf-eager" in hf_systems and start_system("hf-eager"):
            reference_tokens = hf_tokens(model, prompts(1, vocab), 16)
            hf_tokens(model, prompts(1, vocab), 2)
            for b in args.batch:
                record("hf-eager", b, hf_measure(model, prompts(b, vocab), args.new, max(args.repeats - 1, 1), device))
            for p in args.ttft:
                if not over_budget():
                    ids = torch.randint(3, vocab, (1, p), generator=gen).to(device)
                    out["systems"]["hf-eager"].setdefault("ttft_ms", {})[str(p)] = round(
                        hf_measure(model, ids, 2, max(args.repeats - 1, 1), device)["prefill_s"] * 1e3, 3)
            peak("hf-eager")
        if "hf-compile" in hf_systems and start_system("hf-compile"):
            for b in [b for b in args.batch if b in set(args.hf_compile_batches)]:
                if over_budget():
                    break
                ids = prompts(b, vocab)
                t0 = time.perf_counter()
                hf_measure(model, ids, args.new, 1, device, cache_implementation="static")  # compiles
                out["systems"].setdefault("hf-compile", {"batches": {}})["compile_s_batch%d" % b] = round(
                    time.perf_counter() - t0, 1)
                m = hf_measure(model, ids, args.new, args.repeats, device, cache_implementation="static")
                record("hf-compile", b, m)
                if b == 1 and args.prompt in args.ttft:  # other prompt lengths would recompile
                    out["systems"]["hf-compile"].setdefault("ttft_ms", {})[str(args.prompt)] = round(
                        m["prefill_s"] * 1e3, 3)
            peak("hf-compile")
        del model
        try:
            torch._dynamo.reset()
        except Exception:  # pragma: no cover - dynamo missing
            pass
        free(device)

    # policyinject: kernels and kernels+graphs share one injected model; int8 / int4 each build their own
    groups = [("kernels", "graphs"), ("int8",), ("int4",), ("int8-head",), ("int4-head",), ("int4-g128",),
              ("int4-g128-head",)]
    for group in groups:
        wanted = [c for c in group if c in configs]
        if not wanted or over_budget():
            for c in wanted:
                out["systems"][c] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        if not start_system(wanted[0]):
            continue
        t0 = time.perf_counter()
        model = build_model(spec, dtype, device)
        vocab = model.config.vocab_size
        if "weights" not in out:
            out["weights"] = weight_bytes(model)
            out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            out["layer_params"] = layer_params(model)
            out["model_config"] = model.config
        try:
            engine = pi_engine(model, wanted[-1], args.dtype, max_len)
        except Exception as exc:  # a config this build cannot run: record it, go on
            for c in wanted:
                out["systems"][c] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  {spec} {'/'.join(wanted)}: {type(exc).__name__}: {exc}")
            del model
            free(device)
            continue
        setup_s = round(time.perf_counter() - t0, 1)
        wbytes = weight_bytes(model)
        for system in wanted:
            if system != wanted[0] and not start_system(system):
                continue
            try:
                decoder = pi_decoder(engine, use_graphs=system != "kernels")
                for b in args.batch:
                    if over_budget():
                        break
                    record(system, b, pi_measure(decoder, prompts(b, vocab), args.new, args.repeats, device))
                row = out["systems"].setdefault(system, {"batches": {}})
                for p in args.ttft:
                    if not over_budget():
                        ids = torch.randint(3, vocab, (1, p), generator=gen).to(device)
                        row.setdefault("ttft_ms", {})[str(p)] = round(pi_ttft(decoder, ids, args.repeats, device)
                                                                      * 1e3, 3)
                        log(f"  {spec} {LABELS[system]:>18} time to first token, prompt {p}: "
                            f"{row['ttft_ms'][str(p)]:8.2f} ms")
                row["setup_s"] = setup_s
                row["weights"] = wbytes
                if reference_tokens is not None:
                    got = decoder.generate(reference_tokens[:, :args.prompt], max_new_tokens=16, eos_token_id=[])
                    row["greedy_tokens_equal_hf_first16"] = int(
                        (got[0, args.prompt:] == reference_tokens[0, args.prompt:]).cumprod(0).sum())
                stats = getattr(decoder, "stats", None)
                if stats:
                    row["decoder"] = dict(stats)
                del decoder
            except Exception as exc:
                out["systems"][system] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"  {spec} {system}: {type(exc).__name__}: {exc}")
            peak(system)
        del engine, model
        free(device)

    # roofline per system (weights as that system stores them)
    default_w = out.get("weights", {})
    cfg = out.pop("model_config", None)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    flops = args.matmul_flops
    if default_w.get("read_per_token") and out.get("layer_params"):
        out["ttft_roofline_ms"] = {str(p): round(ttft_roofline_s(out["layer_params"], default_w["read_per_token"],
                                                                 p, flops, bandwidth) * 1e3, 3) for p in args.ttft}
    for system, row in out["systems"].items():
        if not isinstance(row, dict):
            continue
        wb = row.get("weights", default_w)
        for b, cell in row.get("batches", {}).items():  # batch-B roofline: weights + the KV bytes a step reads
            if cfg is None or not wb.get("read_per_token") or not cell.get("ms_per_token"):
                continue
            kv = kv_bytes_per_step(cfg, int(b), args.prompt + args.new // 2, dtype_bytes)
            roof = (wb["read_per_token"] + kv) / bandwidth * 1e3
            cell["roofline_ms"] = round(roof, 3)
            cell["roofline_fraction"] = round(roof / cell["ms_per_token"], 3)
        for p, ms in row.get("ttft_ms", {}).items():
            if out.get("ttft_roofline_ms", {}).get(p) and ms:
                row.setdefault("ttft_roofline_fraction", {})[p] = round(out["ttft_roofline_ms"][p] / ms, 3)
    for key, name in (("all", "roofline_ms"), ("read_per_token", "roofline_read_ms")):
        out[name] = round(default_w[key] / bandwidth * 1e3, 3) if default_w.get(key) else None
    compiled = out["systems"].get("hf-compile", {}).get("batches", {}).get("1", {}).get("ms_per_token")
    for system, row in out["systems"].items():
        b1 = row.get("batches", {}).get("1") if isinstance(row, dict) else None
        if not b1:
            continue
        wb = row.get("weights", default_w)
        for key, suffix in (("all", ""), ("read_per_token", "_read")):
            if not wb.get(key):
                continue
            roof = wb[key] / bandwidth * 1e3
            row[f"roofline{suffix}_ms"] = round(roof, 3)
            row[f"roofline{suffix}_fraction"] = round(roof / b1["ms_per_token"], 3) if b1["ms_per_token"] else None
        if compiled:
            row["speedup_vs_hf_compile"] = round(compiled / b1["ms_per_token"], 2) if b1["ms_per_token"] else None
    return out


def format_table(result: Dict[str, Any]) -> str:
    """The compact final table: one row per (model, system)."""
    batches = result["batch"]
    head = ["model", "system", "ms/tok b1", "roofline", "frac", "read roof", "frac", "vs compiled", "prefill ms"]
    ttft = [str(p) for p in result.get("ttft_prompts", [])]
    head += [f"ttft {p}" for p in ttft]
    head += [f"tok/s b{b} (frac)" for b in batches if b != 1] + ["peak GiB"]
    rows = [head]
    for spec, preset in result["presets"].items():
        for system in ALL_CONFIGS:
            row = preset["systems"].get(system)
            if row is None:
                continue
            if "batches" not in row:
                rows.append([spec, LABELS[system], row.get("skipped") or row.get("error", "")[:60]]
                            + [""] * (len(head) - 3))
                continue
            b1 = row["batches"].get("1", {})
            cells = [spec, LABELS[system], _f(b1.get("ms_per_token")), _f(row.get("roofline_ms")),
                     _f(row.get("roofline_fraction"), "{:.0%}"), _f(row.get("roofline_read_ms")),
                     _f(row.get("roofline_read_fraction"), "{:.0%}"), _f(row.get("speedup_vs_hf_compile"), "{:.2f}x"),
                     _f(b1.get("prefill_ms"), "{:.1f}")]
            cells += [_f(row.get("ttft_ms", {}).get(p), "{:.1f}") for p in ttft]
            for b in [b for b in batches if b != 1]:
                cell = row["batches"].get(str(b), {})
                frac = cell.get("roofline_fraction")
                cells.append(_f(cell.get("tokens_per_s"), "{:.0f}") + (f" ({frac:.0%})" if frac else ""))
            cells.append(_f(row.get("peak_gib"), "{:.1f}"))
            rows.append(cells)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    info = (f"{result['card']} | {result['dtype']} | prompt {result['prompt']} | new {result['new']} | "
            f"copy {result['copy_tb_s']:.2f} TB/s | matmul {result.get('matmul_tflops', 0):.0f} TFLOP/s | "
            f"torch {result['torch']} | triton {result.get('triton')} | transformers {result['transformers']}")
    roofs = [f"{spec}: ttft roofline " + ", ".join(f"{p} -> {ms:.2f} ms" for p, ms in
                                                   pre.get("ttft_roofline_ms", {}).items())
             for spec, pre in result["presets"].items() if pre.get("ttft_roofline_ms")]
    return info + "\n" + "\n".join(lines + roofs)


def _f(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the benchmark; returns the result dict (also written to ``--json``)."""
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"no CUDA GPU here (torch {torch.__version__}); use --device cpu for a smoke test")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.processor() or platform.machine()})"
    transformers = require("transformers", "bench")
    if args.plot_path:
        require("matplotlib", "bench")

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    bandwidth = copy_bandwidth(device)
    args.matmul_flops = matmul_rate(device, dtype=_DTYPES[args.dtype] if device.type == "cuda" else torch.float32)
    result: Dict[str, Any] = {
        "card": card, "dtype": args.dtype, "prompt": args.prompt, "new": args.new, "batch": list(args.batch),
        "copy_tb_s": round(bandwidth / 1e12, 3), "torch": torch.__version__,
        "matmul_tflops": round(args.matmul_flops / 1e12, 1), "ttft_prompts": list(args.ttft),
        "transformers": transformers.__version__, "triton": triton_version, "presets": {},
        "method": "ms/token: policyinject (T(new)-T(1))/(new-1) over whole calls; HF per-token timestamps; "
                  "roofline = all weight bytes / copy bandwidth; read roofline = the bytes a step reads (no untied input "
                  "embedding) / copy bandwidth",
    }
    log(f"{card}: copy {bandwidth / 1e12:.2f} TB/s")
    for spec in args.preset:
        result["presets"][spec] = bench_preset(spec, args, device, bandwidth, started, log)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.plot_path:
        try:
            plot_panels(result, args.plot_path, LABELS, list(ALL_CONFIGS))
        except ImportError:
            log("matplotlib is not installed: no plot")
    log("")
    log(format_table(result))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
