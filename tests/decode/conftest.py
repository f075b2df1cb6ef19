"""Helpers of the decode-engine tests: tiny models injected through the public pipeline, HF references."""

from __future__ import annotations

import copy
from typing import Any, Callable, Tuple

import pytest
import torch

from policyinject.presets import tiny_model


def _init_inference() -> Callable:
    try:
        from policyinject import init_inference
    except ImportError:  # the package root may not re-export it yet
        from policyinject.pipeline import init_inference
    return init_inference


@pytest.fixture
def injected() -> Callable[..., Tuple[torch.nn.Module, Any]]:
    """``injected(arch, **config) -> (hf_reference_copy, engine)``: a tiny fp32 model, kernel-injected."""

    def build(arch: str, seed: int = 0, **config: Any) -> Tuple[torch.nn.Module, Any]:
        model = tiny_model(arch, seed=seed)
        reference = copy.deepcopy(model)
        config.setdefault("dtype", "fp32")
        config.setdefault("replace_with_kernel_inject", True)
        engine = _init_inference()(model, **config)
        return reference, engine

    return build


@pytest.fixture
def decoder_of() -> Callable[..., Any]:
    """``decoder_of(engine, use_graphs=False)``: the engine's own decoder, or a fresh one."""
    from policyinject.decode.generate import Decoder

    def get(engine: Any, use_graphs: bool = False) -> Any:
        return Decoder.from_engine(engine, use_graphs=use_graphs)

    return get


def prompts(lengths, seed: int = 0, low: int = 3, high: int = 256) -> list:
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
