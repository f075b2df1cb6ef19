"""Rooflines and the plot of the decode benchmark (:mod:`policyinject.bench.decode`).

- :func:`kv_bytes_per_step`: the KV-cache bytes one decode step reads at a batch and context length;
- :func:`matmul_rate`: the bf16 (or the given dtype) matrix-product rate measured on the device, the compute
  ceiling of a long prefill;
- :func:`ttft_roofline_s`: the time-to-first-token floor, the larger of the weight read and the matmul
  arithmetic of a prompt;
- :func:`plot_panels`: one panel per metric (batch-1 ms/token, time to first token per prompt length, tokens/s
  per batch, peak memory), one row per model.

Example:
    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, hidden_size=4096, num_attention_heads=32)
    >>> kv_bytes_per_step(cfg, batch=1, context=1000, dtype_bytes=2) / 1e6  # Llama-3-8B, 1000 tokens
    131.072
    >>> round(ttft_roofline_s(8e9, 15e9, 128, 790e12, 4.2e12) * 1e3, 2)  # weights read, not arithmetic
    3.57
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List

import torch

__all__ = ["kv_bytes_per_step", "matmul_rate", "ttft_roofline_s", "plot_panels", "layer_params"]


def kv_bytes_per_step(config: Any, batch: int, context: int, dtype_bytes: int) -> int:
    """K and V bytes a decode step reads: ``2 * layers * kv_heads * head_dim * context * batch * dtype_bytes``."""
    heads = int(getattr(config, "num_attention_heads"))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * int(context) * int(batch) * int(dtype_bytes)


def layer_params(model: torch.nn.Module) -> int:
    """Parameters a prompt token multiplies by: all but the input embedding and the output head (which a
    prefill applies to the last position only).

    Example:
        >>> from policyinject.testing.presets import tiny_model
        >>> m = tiny_model("llama")
        >>> layer_params(m) < sum(p.numel() for p in m.parameters())
        True
    """
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None:
            skip.update(id(p) for p in mod.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def matmul_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` product on random data (CUDA events, median of ``repeats`` after a warm-up);
    on the CPU a small product timed with the host clock."""
    if device.type != "cuda":
        import time

        a = torch.randn(256, 256)
        t0 = time.perf_counter()
        a @ a
        return 2 * 256 ** 3 / max(time.perf_counter() - t0, 1e-9)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def ttft_roofline_s(layer_params_: float, read_bytes: float, prompt: int, flops: float, bandwidth: float) -> float:
    """The floor of a prefill: ``max(2 * layer_params * prompt / flops, read_bytes / bandwidth)`` (attention
    arithmetic and the head left out: a lower bound)."""
    return max(2.0 * layer_params_ * prompt / flops, read_bytes / bandwidth)


def plot_panels(result: Dict[str, Any], path: str, labels: Dict[str, str], order: List[str]) -> None:
    """A PNG with one row per model and one panel per metric (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(result["presets"])
    batches = [b for b in result["batch"] if b != 1]
    metrics = ["ms/token, batch 1", "time to first token (ms)"] + [f"tokens/s, batch {b}" for b in batches] + \
        ["peak GiB"]
    fig, axes = plt.subplots(len(presets), len(metrics), figsize=(4.2 * len(metrics), 4.2 * len(presets)),
                             squeeze=False)
    for r, spec in enumerate(presets):
        pre = result["presets"][spec]
        systems = [s for s in order if "batches" in pre["systems"].get(s, {})]
        names = [labels[s] for s in systems]
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            if metric.startswith("ms/token"):
                vals = [pre["systems"][s]["batches"].get("1", {}).get("ms_per_token") for s in systems]
                roof = pre.get("roofline_read_ms")
                if roof:
                    ax.axhline(roof, color="tab:red", linestyle="--", label=f"bf16 read roofline {roof:.2f}")
                    ax.legend(fontsize=7)
                ax.bar(names, [v or 0 for v in vals], color="tab:blue")
            elif metric.startswith("time to first"):
                prompts = [str(p) for p in result.get("ttft_prompts", [])]
                width = 0.8 / max(len(prompts), 1)
                for i, p in enumerate(prompts):
                    vals = [pre["systems"][s].get("ttft_ms", {}).get(p) or 0 for s in systems]
                    ax.bar([x + i * width for x in range(len(systems))], vals, width, label=f"prompt {p}")
                ax.set_xticks(range(len(systems)))
                ax.set_xticklabels(names)
                ax.legend(fontsize=7)
            elif metric.startswith("tokens/s"):
                b = metric.rsplit(" ", 1)[1]
                vals = [pre["systems"][s]["batches"].get(b, {}).get("tokens_per_s") or 0 for s in systems]
                ax.bar(names, vals, color="tab:green")
            else:
                ax.bar(names, [pre["systems"][s].get("peak_gib") or 0 for s in systems], color="tab:gray")
            ax.set_title(f"{spec}: {metric}", fontsize=9)
            ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(f"{result['card']} | {result['dtype']} | torch {result['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
