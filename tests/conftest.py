"""Session-wide test setup.

Runs at import time, before any test module imports policyinject's kernels:

- ``HF_HUB_OFFLINE=1``: tests never reach the Hugging Face Hub.
- Without CUDA, ``TRITON_INTERPRET=1`` so ``backend="triton"`` runs the kernels on CPU tensors (Triton reads
  it when ``@triton.jit`` decorates a kernel, i.e. when the kernel module is first imported).
- Tests marked ``gpu`` are skipped without CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
