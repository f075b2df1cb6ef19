"""Helpers shared by the test packages (imported as ``pi_testing``; ``tests/`` is on sys.path via its conftest).

Example:
    >>> import torch
    >>> rel_err(torch.ones(3), torch.ones(3))
    0.0
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch


def _init_inference() -> Callable:
    from policyinject import init_inference

    return init_inference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error by norm; NaN or inf never passes (it returns inf)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (logits, last hidden state, or the first element)."""
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, tuple) else out


def prompts(lengths, seed: int = 0, low: int = 3, high: int = 256) -> list:
    """Random 1-D token tensors of the given lengths (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (n,), generator=g) for n in lengths]


def left_pad(seqs: list, pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token tensors into ``(input_ids, attention_mask)``."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    return ids, mask
