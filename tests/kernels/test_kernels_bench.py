"""benchmarks/kernels.py and policyinject.testing.roofline on the CPU: the plumbing of the GPU benchmark (``--smoke`` runs
the Triton kernels under TRITON_INTERPRET=1, set by conftest), the bytes-moved accounting, and the
steady-state timing helper (host clock off CUDA)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from policyinject.testing.roofline import copy_bandwidth, steady_state_seconds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("kernels_bench", ROOT / "benchmarks" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_roofline_steady_state_rotates_sets_and_keeps_outputs() -> None:
    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.data_ptr())
        return x + 1

    sets = [(torch.randn(64),) for _ in range(4)]
    sec = steady_state_seconds(fn, sets, calls=6, repeats=2)  # rounded up to 8 calls (a multiple of 4)
    assert sec > 0
    # warm-up (one call per set), then 2 samples of 8 calls, always cycling through the sets in order
    ptrs = [s[0].data_ptr() for s in sets]
    assert seen == ptrs * (1 + 2 * 2)
    with pytest.raises(ValueError):
        steady_state_seconds(fn, [])


def test_roofline_copy_bandwidth_modes() -> None:
    cpu = torch.device("cpu")
    assert copy_bandwidth(cpu, nbytes=1 << 16, repeats=2) > 0  # default: the old single-copy method
    assert copy_bandwidth(cpu, nbytes=1 << 16, repeats=2, sets=4, calls=8, graph=True) > 0  # graph ignored off CUDA


def test_kernels_bench_n_sets(bench) -> None:
    assert bench.n_sets(1) == bench.MAX_SETS  # tiny: capped
    assert bench.n_sets(67 * 10**6) == 4  # rms_norm 4096 x 4096: 4 sets, 268 MB
    assert bench.n_sets(10 * 2**20) == min(bench.MAX_SETS, 20)
    assert bench.n_sets(2**30) == bench.MIN_SETS


def test_kernels_bench_rotary_case_is_the_injected_layout(bench) -> None:
    cases = bench.build_cases(quick=True, dev="cpu", smoke=True)
    rope = next(c for c in cases if c.kernel == "rotary")
    b, hq, hkv, t, d = bench.SMOKE_ROPE_SHAPES[0]
    q, k = rope.make()
    # views of one fused [B, T, (Hq + 2 Hkv) D] projection, as the injected attention splits it
    row = (hq + 2 * hkv) * d
    assert q.shape == (b, hq, t, d) and k.shape == (b, hkv, t, d)
    assert q.stride() == (t * row, d, row, 1) and k.stride() == q.stride()
    assert k.data_ptr() - q.data_ptr() == hq * d * q.element_size()
    # bytes: q and k read and written, cos and sin read once; v untouched
    qk = (q.numel() + k.numel()) * 2
    assert rope.moved((q, k)) == 2 * qk + 2 * b * t * d * 2
    norm = next(c for c in cases if c.kernel == "add_rms_norm")
    x, r = norm.make()
    assert norm.moved((x, r)) == 4 * x.numel() * 2 + x.shape[-1] * 2


def test_kernels_bench_smoke_runs_end_to_end(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "k.json"
    rc = bench.main(["--smoke", "--quick", "--calls", "1", "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] and data["copy_tbps"] > 0 and data["copy_single_tbps"] > 0
    kernels = {r["kernel"] for r in data["results"]}
    assert {"rms_norm", "add_rms_norm", "layer_norm", "add_layer_norm", "rotary", "swiglu"} <= kernels
    for r in data["results"]:
        assert r["ok"], r
        assert r["sets"] >= 4 and r["calls"] % r["sets"] == 0
        for key in ("ours_us", "copy_same_us", "eager_us", "host_us", "ref_eager_us"):
            assert r[key] > 0 and math.isfinite(r[key]), (r["kernel"], key, r[key])
        assert math.isnan(r["flushed_us"])  # do_bench needs CUDA
    assert "%copy1G" in text and "%copySS" in text and "target: rms_norm" in text


def test_kernels_bench_sweeps_smoke(bench) -> None:
    timer = bench.Timer(cuda=False, calls=1, repeats=1, rep_ms=1)
    rows = bench.sweeps("cpu", 1.0, timer, 132, smoke=True)
    names = {r["kernel"].split()[0] for r in rows}
    assert names == {"rms_norm", "layer_norm", "add_rms_norm", "rotary", "swiglu"}
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r][:2]
    assert all(r["us"] > 0 for r in rows)
    assert sum(r["default"] for r in rows) == 5
    bench.print_sweeps(rows)


def test_kernels_bench_needs_cuda_without_smoke(bench, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    assert bench.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
