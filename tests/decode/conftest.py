"""Helpers of the decode-engine tests: tiny models injected through the public pipeline, HF references."""

from __future__ import annotations

import copy
from typing import Any, Callable, Tuple

import pytest
import torch

from pi_testing import _init_inference

from policyinject.testing.presets import tiny_model


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
