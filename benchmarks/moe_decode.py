"""MoE decode benchmark: ms/token of the engine (bf16, int8 and int4 experts) against the roofline of the bytes
a decode step reads and against Hugging Face eager ``generate``.

Shapes (random weights materialised on the device): ``mixtral-8x7b`` (about 94 GB in bf16, fits one H200),
``qwen3-30b-a3b``; ``tiny`` runs on a CPU in seconds (a check of the script, not a measurement).

Roofline bytes per decode step, for a batch of ``B`` sequences at context ``L``:
attention weights (q, k, v, o) + norms + router + shared expert + the output head (every layer, read once),
the KV cache read (``2 * layers * kv_heads * head_dim * L * B`` elements), and the routed experts that the
batch's tokens select: per layer ``D`` distinct experts of ``3 * H * I`` weights each (plus scales when
quantized). ``D`` is the expected number of distinct experts over ``B`` tokens that each pick ``k`` distinct
experts of ``E`` uniformly and independently, ``E * (1 - (1 - k / E) ** B)`` (``k`` at ``B == 1``); the
number the random router actually picks on one step is counted too (``distinct_measured``, from the Hugging
Face model's router on the prompt's last positions). The bandwidth is a copy measured in the same run.

Run:  python benchmarks/moe_decode.py --preset mixtral-8x7b qwen3-30b-a3b --json moe.json --log moe.log
      python benchmarks/moe_decode.py --preset tiny            # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

PRESETS: Dict[str, Dict[str, Any]] = {
    "mixtral-8x7b": dict(cls="Mixtral", config=dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096)),
    "qwen3-30b-a3b": dict(cls="Qwen3Moe", config=dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096)),
    "tiny": dict(cls="Mixtral", config=dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)),
}

VARIANTS = {"bf16": dict(), "int8": dict(dtype="int8"),
            "int4": dict(quant={"enabled": True, "weight": {"num_bits": 4}})}


def log(msg: str, fh: Any) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import transformers

    entry = PRESETS[preset]
    config = getattr(transformers, f"{entry['cls']}Config")(**entry["config"], bos_token_id=0, eos_token_id=None,
                                                            pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, f"{entry['cls']}ForCausalLM")._from_config(config, dtype=dtype)
    return model.eval()


def expected_distinct(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts chosen by ``batch`` tokens picking ``top_k`` each, uniformly.

    Example:
        >>> expected_distinct(8, 2, 1), round(expected_distinct(8, 2, 16), 2)
        (2.0, 7.92)
    """
    if batch == 1:
        return float(top_k)
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def copy_bandwidth(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n * 2 / statistics.median(times)


def step_bytes(model: torch.nn.Module, preset: str, batch: int, context: int, bits: int,
               distinct: float) -> Dict[str, float]:
    """Bytes one decode step reads (see the module docstring); weights are counted before quantization."""
    cfg = model.config
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or h // heads
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w = 2.0  # bf16 activations and float weights
    wq = bits / 8 + (2.0 * 2 / 32 if bits == 4 else 2.0 / h if bits == 8 else 0)  # + scales/zeros (approx.)
    attn = layers * (h * heads * d + 2 * h * kv * d + heads * d * h) * (w if bits == 16 else wq)
    kv_cache = layers * 2 * kv * d * context * batch * w
    router = layers * experts * h * w
    routed = layers * distinct * 3 * h * inter * (w if bits == 16 else wq)
    head = cfg.vocab_size * h * w
    return {"attention": attn, "kv_cache": kv_cache, "router": router, "routed_experts": routed, "lm_head": head,
            "total": attn + kv_cache + router + routed + head}


def time_generate(fn: Any, ids: torch.Tensor, new: int, device: torch.device, repeats: int) -> float:
    """ms per generated token: (time of ``new`` tokens - time of 1 token) / (new - 1), median of repeats."""
    def once(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - t0

    once(2)  # warm-up (and graph capture)
    diffs = []
    for _ in range(repeats):
        diffs.append((once(new) - once(1)) / (new - 1))
    return 1e3 * statistics.median(diffs)


def profile_kernels(fn: Any, ids: torch.Tensor, new: int, label: str, fh: Any, top: int = 20) -> None:
    """Per decode step GPU time of the kernels of one ``generate`` call (graph replays included), largest
    first, with the sum of all kernels against the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    log(f"{label} profile: kernels {total / new / 1e3:.3f} ms per token (wall {1e3 * wall / new:.3f}), "
        f"{sum(r[2] for r in rows) / new:.0f} launches per token", fh)
    for name, us, count in rows[:top]:
        log(f"    {us / new:9.1f} us/token {count / new:7.1f}x  {name[:110]}", fh)


def measured_distinct(model: torch.nn.Module, ids: torch.Tensor) -> Optional[float]:
    """Distinct experts per layer chosen by the last position of each sequence (one eager decode-like step)."""
    counts: List[int] = []

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        logits = out[0] if isinstance(out, tuple) else out
        if logits.dim() == 2 and logits.shape[-1] > 1:
            k = model.config.num_experts_per_tok
            last = logits.view(ids.shape[0], -1, logits.shape[-1])[:, -1]
            counts.append(int(torch.topk(last.float(), k, dim=-1).indices.unique().numel()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules()
               if n.endswith("mlp.gate") and hasattr(m, "weight")]
    with torch.no_grad():
        model(ids)
    for hd in handles:
        hd.remove()
    return statistics.mean(counts) if counts else None


def run_preset(preset: str, args: argparse.Namespace, device: torch.device, bw: Optional[float], fh: Any) -> list:
    """Every variant of one preset: the model is built once per variant and serves every batch size."""
    import policyinject as pi

    rows = []
    float_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = PRESETS[preset]["config"]["vocab_size"]
    prompts = {b: torch.randint(3, vocab, (b, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
               for b in args.batch}
    context = args.prompt + args.new_tokens // 2
    hf_ms: Dict[int, Optional[float]] = {b: None for b in args.batch}
    distinct_hf: Dict[int, Optional[float]] = {b: None for b in args.batch}
    for variant in args.variants:
        model = engine = None
        try:
            model = build(preset, device, float_dtype)
            if variant == args.variants[0] and not args.no_hf:
                for b, ids in prompts.items():
                    distinct_hf[b] = measured_distinct(model, ids)
                    with torch.no_grad():
                        hf_ms[b] = time_generate(model.generate, ids, args.hf_tokens, device, 1)
                    log(f"{preset} B={b} HF eager: {hf_ms[b]:.2f} ms/token", fh)
            kwargs = dict(VARIANTS[variant])
            kwargs.setdefault("dtype", "bf16" if device.type == "cuda" else "fp32")
            engine = pi.init_inference(model, replace_with_kernel_inject=True,
                                       enable_cuda_graph=device.type == "cuda",
                                       max_out_tokens=args.prompt + args.new_tokens + 8, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            for b in args.batch:
                rows.append(dict(preset=preset, batch=b, prompt=args.prompt, variant=variant,
                                 skipped=f"out of memory: {str(exc).splitlines()[0]}"))
            log(f"{preset} {variant}: skipped (out of memory)", fh)
            model = engine = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        bits = {"bf16": 16, "int8": 8, "int4": 4}[variant]
        cfgm = model.config
        experts = getattr(cfgm, "num_local_experts", None) or cfgm.num_experts
        for b, ids in prompts.items():
            row: Dict[str, Any] = dict(preset=preset, batch=b, prompt=args.prompt, variant=variant,
                                       float_dtype=str(float_dtype))
            try:
                with torch.no_grad():
                    ms = time_generate(engine.generate, ids, args.new_tokens, device, args.repeats)
            except torch.cuda.OutOfMemoryError as exc:
                row["skipped"] = f"out of memory: {str(exc).splitlines()[0]}"
                log(f"{preset} B={b} {variant}: skipped ({row['skipped']})", fh)
                rows.append(row)
                continue
            if args.profile and device.type == "cuda":
                profile_kernels(engine.generate, ids, args.new_tokens, f"{preset} B={b} {variant}", fh)
            dist_exp = expected_distinct(experts, cfgm.num_experts_per_tok, b)
            nbytes = step_bytes(model, preset, b, context, bits, dist_exp)
            roof = 1e3 * nbytes["total"] / bw if bw else None
            row.update(ms_per_token=ms, hf_eager_ms_per_token=hf_ms[b],
                       speedup_vs_hf=(hf_ms[b] / ms) if hf_ms[b] else None, roofline_ms=roof,
                       fraction_of_roofline=(roof / ms) if roof else None, bytes=nbytes,
                       distinct_expected=dist_exp, distinct_measured=distinct_hf[b],
                       decoder="engine" if engine.plan.decode and not engine.plan.decode.problems else "hf")
            log(f"{preset} B={b} {variant}: {ms:.2f} ms/token, roofline "
                f"{'-' if roof is None else f'{roof:.2f}'} ms ({row['fraction_of_roofline'] or 0:.0%}), "
                f"{row['speedup_vs_hf'] or 0:.1f}x HF eager, distinct experts {dist_exp:.2f} "
                f"(measured {distinct_hf[b]}), decoder {row['decoder']}", fh)
            rows.append(row)
        model = engine = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"], choices=sorted(PRESETS))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hf-tokens", type=int, default=4, help="tokens of the (slow) Hugging Face eager timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--log", default=None)
    p.add_argument("--profile", action="store_true",
                   help="also print the top kernels of one engine generate per (variant, batch), per decode step")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fh = open(args.log, "w") if args.log else None
    import transformers
    import triton

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    bw = copy_bandwidth(device)
    header = dict(card=card, torch=torch.__version__, transformers=transformers.__version__,
                  triton=triton.__version__, date=time.strftime("%Y-%m-%d"), copy_bandwidth_bytes_s=bw,
                  prompt=args.prompt, new_tokens=args.new_tokens, batches=args.batch)
    log(json.dumps(header), fh)
    rows = []
    for preset in args.preset:
        rows += run_preset(preset, args, device, bw, fh)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    if fh is not None:
        fh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
