"""AOT-compile every kernel for sm_90 (H100) in bf16 and fp16, and check the launch error without a GPU.

Both run in a fresh subprocess without TRITON_INTERPRET (the test session sets it in conftest when there is
no CUDA, and Triton reads it when the kernel modules are imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def aot_rows() -> list:
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, str(HERE / "kernel_aot.py")], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"kernel_aot.py printed nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return rows


def test_every_kernel_compiles_for_sm90(aot_rows: list) -> None:
    failed = [r for r in aot_rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']} {r['dtype']}: {r['error']}" for r in failed)
    names = {(r["name"], r["dtype"]) for r in aot_rows}
    for kernel in ("rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "rotary_half",
                   "rotary_interleaved", "rotary_partial_copy", "swiglu", "geglu_tanh", "geglu_exact"):
        for dt in ("bf16", "fp16"):
            assert (kernel, dt) in names


def test_compiled_kernels_are_lean(aot_rows: list) -> None:
    """No register spills, little shared memory, and 16-byte global loads (memory-bound kernels need them)."""
    for r in aot_rows:
        what = f"{r['name']} {r['dtype']}"
        assert not r["local"], f"{what} spills to local memory"
        assert r["shared"] <= 16 * 1024, f"{what} uses {r['shared']} B of shared memory"
        assert r["v4_loads"] > 0, f"{what} has no 16-byte global loads"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_clear_error_without_gpu_and_interpreter() -> None:
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from policyinject.errors import UnsupportedError\n"
        "from policyinject.kernels.norms import rms_norm\n"
        "try:\n"
        "    rms_norm(torch.randn(2, 8), torch.ones(8), backend='triton')\n"
        "except UnsupportedError as e:\n"
        "    print('OK', e)\n"
        "print('auto', rms_norm(torch.randn(2, 8), torch.ones(8)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in proc.stdout and "CUDA" in proc.stdout
    assert "active drivers" not in proc.stdout
    assert "auto torch.Size([2, 8])" in proc.stdout
