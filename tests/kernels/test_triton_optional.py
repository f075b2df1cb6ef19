"""Without Triton the package imports, quantizes, injects kernels and generates on the PyTorch backend.

Each run is a fresh subprocess. The Triton-less one installs a ``sys.meta_path`` finder that raises
``ImportError`` for ``triton`` and ``triton.*`` before anything imports it (as on macOS, Windows or a machine
without the package). Its greedy tokens must equal those of the same config in a process where Triton imports
but ``kernel_backend="torch"`` is forced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import importlib, importlib.abc, json, pkgutil, sys, types

HIDE = sys.argv[1] == "hide"


class HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None


if HIDE:
    sys.meta_path.insert(0, HideTriton())

import torch

import policyinject
from policyinject.errors import UnsupportedError
from policyinject.testing.presets import tiny_model

CONFIGS = {
    "int8": dict(dtype="int8"),
    "int4": dict(dtype="fp32", quant={"enabled": True, "weight": {"num_bits": 4}}),
}
out = {"tokens": {}, "quant_linears": {}}
for name, config in CONFIGS.items():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    extra = {} if HIDE else {"kernel_backend": "torch"}
    engine = policyinject.init_inference(model, replace_with_kernel_inject=True, **config, **extra)
    tokens = engine.generate(ids, max_new_tokens=6, do_sample=False)
    out["tokens"][name] = tokens.tolist()
    out["quant_linears"][name] = sum(type(m).__name__ == "QuantLinear" for m in model.modules())

if HIDE:
    from policyinject.kernels._common import resolve_backend, triton_importable, use_triton
    from policyinject.kernels.gemv import gemv
    from policyinject.kernels.quant_matmul import quant_matmul
    from policyinject.kernels.quantize import quantize_weight

    fake_cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=torch.float16)
    out["auto_on_cuda"] = [resolve_backend("auto", fake_cuda), use_triton("auto", fake_cuda)]
    out["importable"] = triton_importable()
    errors = []
    for call in (lambda: quant_matmul(torch.randn(1, 64), quantize_weight(torch.randn(8, 64), 8), backend="triton"),
                 lambda: gemv(torch.randn(1, 64), torch.randn(8, 64), backend="triton")):
        try:
            call()
            errors.append(None)
        except UnsupportedError as e:
            errors.append(str(e))
    out["triton_errors"] = errors
    failed = {}
    for info in pkgutil.walk_packages(policyinject.__path__, "policyinject."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            failed[info.name] = str(e)
    out["import_failures"] = failed
out["triton_loaded"] = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))[:3]
print(json.dumps(out))
'''


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{mode} run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs() -> dict:
    pytest.importorskip("transformers")
    return {"hidden": _run("hide"), "torch": _run("torch")}


def test_generate_without_triton_matches_the_forced_torch_backend(runs: dict) -> None:
    hidden, forced = runs["hidden"], runs["torch"]
    assert hidden["triton_loaded"] == []  # nothing imported triton behind the finder's back
    for name in ("int8", "int4"):
        assert hidden["quant_linears"][name] == forced["quant_linears"][name] > 0, name
        tokens = hidden["tokens"][name]
        assert len(tokens) == 2 and all(len(row) == 7 + 6 for row in tokens), tokens
        assert tokens == forced["tokens"][name], name


def test_without_triton_auto_picks_torch_and_triton_is_a_clear_error(runs: dict) -> None:
    hidden = runs["hidden"]
    assert hidden["importable"] is False
    assert hidden["auto_on_cuda"] == ["torch", False]  # CUDA tensors, no triton: the PyTorch reference
    for message in hidden["triton_errors"]:
        assert message is not None and "needs the triton package" in message and "backend='torch'" in message


def test_only_triton_kernel_modules_need_triton(runs: dict) -> None:
    """Every module imports without triton except the private ``_*_triton`` kernel modules."""
    failures = runs["hidden"]["import_failures"]
    assert all(name.rsplit(".", 1)[-1].endswith("_triton") for name in failures), failures
    assert "policyinject.kernels._quant_gemv_triton" in failures  # the finder did hide triton
