"""Split-KV decode attention: kernel (interpreter or GPU) against a float64 reference, at positions that end
mid-chunk, exactly on a chunk boundary and before some splits start; NaN-poisoned outputs, scratch and masked
cache slots; rotary, sliding window, GQA padding; one CUDA graph replayed at several positions (GPU); and an
sm_90 AOT compile of both kernels (subprocess, no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from policyinject.decode.attention import decode_attention, decode_attention_reference, split_plan

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _need_kernel() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


def _poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.empty`` of the launcher (output and scratch) starts as NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _case(seed, b, hq, hkv, d, max_len, pos, dtype, window=None, r=0, layout=None, holes=True):
    """Fresh random inputs; masked cache slots before ``pos`` and every slot after it hold NaN."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kc, vc = rnd(b + 1, hkv, max_len, d), rnd(b + 1, hkv, max_len, d)
    kv = torch.rand(b, max_len, generator=g) > (0.3 if holes else -1.0)
    kv[:, pos] = True
    kv[:, pos + 1:] = False
    nan_slots = ~kv.clone()
    nan_slots[:, pos] = False
    kc[:b][nan_slots[:, None, :, None].expand(b, hkv, max_len, d)] = float("nan")
    vc[:b][nan_slots[:, None, :, None].expand(b, hkv, max_len, d)] = float("nan")
    q, k, v = rnd(b, hq, 1, d), rnd(b, hkv, 1, d), rnd(b, hkv, 1, d)
    cos = sin = None
    if r:
        angle = rnd(b, 1, r) * 3
        cos, sin = angle.cos(), angle.sin()
    # the reference in float64 from the rounded inputs, with the NaN slots (masked anyway) zeroed
    rounded = [t.to(dtype).double() if t is not None else None for t in (q, k, v, kc, vc, cos, sin)]
    q64, k64, v64, kc64, vc64, cos64, sin64 = rounded
    kc64, vc64 = kc64.nan_to_num(0.0), vc64.nan_to_num(0.0)
    ref = decode_attention_reference(q64, k64, v64, kc64, vc64, torch.tensor([pos]), kv, span=max_len,
                                     window=window, cos=cos64, sin=sin64, rotary=layout)
    dev = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    inputs = dict(q=dev(q), k=dev(k), v=dev(v), k_cache=dev(kc), v_cache=dev(vc),
                  cache_pos=torch.tensor([pos], device=DEVICE), kv_mask=kv.to(DEVICE), span=max_len,
                  window=window, cos=dev(cos), sin=dev(sin), rotary=layout)
    return inputs, ref, (kc64, vc64)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    assert not out.isnan().any(), "NaN in the output (unwritten element or a masked NaN slot leaked)"
    return ((out - ref).norm() / ref.norm()).item()


# (b, hq, hkv, d, max_len, pos, num_splits, block_s, window, dtype): chunk = cdiv(cdiv(n, S), B) * B
SPLIT_CASES = [
    (1, 4, 2, 16, 96, 70, 4, 16, None, torch.float32),    # chunk 32: 32, 32, 6 slots, last split empty
    (1, 4, 2, 16, 96, 64, 4, 16, None, torch.float32),    # chunk 16: ends exactly on a chunk boundary
    (2, 4, 2, 16, 96, 20, 8, 16, None, torch.float32),    # chunk 16: splits 2..7 start past pos (empty)
    (1, 4, 2, 16, 64, 0, 4, 16, None, torch.float32),     # first slot: the new token alone
    (1, 4, 2, 16, 64, 1, 4, 16, None, torch.float32),     # one cached slot
    (2, 12, 2, 24, 80, 77, 3, 16, None, torch.float32),   # G = 6 padded to 16, head_dim 24, odd split count
    (1, 8, 8, 32, 128, 127, 5, 16, None, torch.float32),  # MHA, last slot of the cache
    (2, 4, 1, 16, 96, 90, 4, 16, 20, torch.float32),      # sliding window: only [71, 90) split 4 ways
    (1, 4, 2, 16, 96, 10, 4, 16, 40, torch.float32),      # window wider than the prefix
    (1, 4, 2, 16, 160, 150, 2, 32, None, torch.float32),  # several blocks per split
    (1, 4, 2, 16, 96, 70, 1, 16, None, torch.float32),    # one split: no combine launch
    (2, 8, 2, 32, 64, 45, 4, 16, None, torch.float16),    # 16-bit (bf16 dots are wrong in the interpreter)
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"pos{c[5]}-s{c[6]}-b{c[7]}-w{c[8]}-{str(c[9])[6:]}"
                                                   for c in SPLIT_CASES])
def test_split_kernel_matches_float64_reference(case, monkeypatch):
    _need_kernel()
    b, hq, hkv, d, max_len, pos, splits, block, window, dtype = case
    inputs, ref, (kc64, vc64) = _case(sum(case[:8]), b, hq, hkv, d, max_len, pos, dtype, window)
    _poisoned_empty(monkeypatch)
    out = decode_attention(**inputs, backend="triton", block_s=block, num_splits=splits)
    monkeypatch.undo()
    assert out.shape == (b, hq, 1, d)
    err = _rel(out, ref)
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err
    # the cache: slot pos holds the new k/v, every other slot is untouched (NaN slots stay NaN)
    kc, vc = inputs["k_cache"].double().cpu(), inputs["v_cache"].double().cpu()
    assert torch.equal(kc[:b, :, pos], inputs["k"][:, :, 0].double().cpu())
    assert torch.equal(vc[:b, :, pos], inputs["v"][:, :, 0].double().cpu())
    others = torch.ones(max_len, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(kc[:b, :, others].nan_to_num(0.0), kc64[:b, :, others])
    assert torch.equal(vc[b:], vc64[b:])


@pytest.mark.parametrize("layout,r,pos", [("half", 16, 70), ("interleaved", 16, 33), ("half", 8, 64),
                                          ("interleaved", 6, 5)])
def test_split_kernel_fuses_rotary(layout, r, pos, monkeypatch):
    _need_kernel()
    b, hq, hkv, d, max_len = 2, 4, 2, 16, 96
    inputs, ref, _ = _case(r + pos, b, hq, hkv, d, max_len, pos, torch.float32, r=r, layout=layout)
    _poisoned_empty(monkeypatch)
    out = decode_attention(**inputs, backend="triton", block_s=16, num_splits=4)
    monkeypatch.undo()
    assert _rel(out, ref) < 1e-5
    from policyinject.kernels.reference import rotary

    _, k_rot = rotary(inputs["q"], inputs["k"], inputs["cos"], inputs["sin"], layout=layout)
    assert torch.allclose(inputs["k_cache"][:b, :, pos], k_rot[:, :, 0], atol=1e-6)


def test_default_plan_and_every_position_with_one_static_plan():
    """The plan depends on the span only: the same launch parameters serve every position (a graph)."""
    _need_kernel()
    b, hq, hkv, d, max_len = 1, 4, 2, 16, 64
    splits, block = split_plan(b, hkv, max_len, torch.device(DEVICE))
    assert splits >= 2
    for pos in (0, 3, 15, 16, 17, 40, 63):
        inputs, ref, _ = _case(100 + pos, b, hq, hkv, d, max_len, pos, torch.float32)
        out = decode_attention(**inputs, backend="triton")
        assert _rel(out, ref) < 1e-5, pos


def test_split_plan():
    cpu = torch.device("cpu")  # 16 SMs assumed
    assert split_plan(1, 2, 256, cpu) == (8, 32)
    assert split_plan(1, 4, 4096, cpu) == (4, 64)
    assert split_plan(1, 1, 32, cpu) == (2, 16)
    assert split_plan(1, 1, 16, cpu) == (1, 64)  # one block: nothing to split
    assert split_plan(2, 4, 256, cpu) == (1, 64)  # 8 programs > 16 / 4: the one-program kernel
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert split_plan(1, 8, 256, torch.device("cuda")) == (min(32, sms // 8, 16), 16)
        assert split_plan(32, 8, 256, torch.device("cuda"))[0] == 1


def test_bad_split_arguments():
    _need_kernel()
    inputs, _, _ = _case(0, 1, 4, 2, 16, 32, 5, torch.float32)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(**inputs, backend="triton", num_splits=0)
    with pytest.raises(ValueError, match="block_s"):
        decode_attention(**inputs, backend="triton", block_s=24)


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("d,pos", [(64, 200), (128, 137), (128, 256), (64, 3)])
def test_split_kernel_bf16_model_shapes(d, pos):
    """Llama-3.2-1B (d 64) / Llama-3-8B (d 128) heads, bf16, default plan, rotary fused."""
    b, hq, hkv, max_len = 1, 32, 8, 264
    inputs, ref, _ = _case(d + pos, b, hq, hkv, d, max_len, pos, torch.bfloat16, r=d, layout="half",
                           holes=False)
    out = decode_attention(**inputs)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_one_graph_replays_at_every_position():
    b, hq, hkv, d, max_len = 1, 32, 8, 64, 256
    inputs, _, _ = _case(7, b, hq, hkv, d, max_len, 100, torch.bfloat16, holes=False)
    kv = torch.ones(b, max_len, dtype=torch.bool, device="cuda")
    inputs["kv_mask"] = kv
    for name in ("k_cache", "v_cache"):  # every slot attended later must be finite
        inputs[name].copy_(torch.randn_like(inputs[name]))
    cp = inputs["cache_pos"]
    fn = lambda: decode_attention(**inputs)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for pos in (5, 16, 100, 129, 255):
        cp.fill_(pos)
        graph.replay()
        kc = inputs["k_cache"].clone()
        vc = inputs["v_cache"].clone()
        ref = decode_attention_reference(inputs["q"].double(), inputs["k"].double(), inputs["v"].double(),
                                         kc.double(), vc.double(), cp, kv, span=pos + 1)
        assert _rel(out, ref.cpu()) < 1e-2, pos


# --------------------------------------------------------------------------------------------------- AOT

_AOT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from policyinject.decode import _attention_triton as km

TARGET = GPUTarget("cuda", 90, 32)
ints = ["s_qb", "s_qh", "s_knb", "s_knh", "s_vnb", "s_vnh", "s_cb", "s_ch", "s_cs", "s_mb", "s_ob", "s_oh",
        "s_rb", "window", "span"]

def compile_one(kernel, sig, const, div16):
    sig = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    cc = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs), target=TARGET,
                        options={"num_warps": 4})
    ptx = cc.asm["ptx"]
    return {"shared": int(cc.metadata.shared), "local": bool(re.search(r"\b(ld|st)\.local", ptx)),
            "mma": "mma" in ptx or "wgmma" in ptx}

failed = 0
for dt in ("bf16", "fp16", "fp32"):
    p = "*" + dt
    sig = {n: p for n in ("Q", "KN", "VN", "KC", "VC", "OUT", "COS", "SIN")}
    sig.update(MASK="*u8", POS="*i64", PM="*fp32", PL="*fp32", PACC="*fp32", scale="fp32",
               **{i: "i32" for i in ints})
    div16 = ["Q", "KN", "VN", "KC", "VC", "OUT", "PACC", "s_qb", "s_qh", "s_cb", "s_ch", "s_cs", "s_ob", "s_oh"]
    for name, g, d, r, nsplit, block, window in [
            ("1b", 4, 64, 64, 16, 16, False), ("8b", 4, 128, 128, 16, 16, False), ("8b", 4, 128, 128, 1, 64, False),
            ("8b_window", 4, 128, 128, 1, 64, True), ("window", 2, 80, 32, 8, 32, True)]:
        const = dict(HKV=8, G=g, G_PAD=16, D=d, D_PAD=triton.next_power_of_2(d), BLOCK_S=block, HAS_WINDOW=window,
                     DOT_PREC="ieee" if dt == "fp32" else None, R=r, INTERLEAVED=False)
        if nsplit == 1:
            kernel = km.decode_attention_single_kernel
            ksig = {k: v for k, v in sig.items() if k not in ("PM", "PL", "PACC")}
        else:
            kernel, const["NSPLIT"] = km.decode_attention_kernel, nsplit
            ksig = {k: v for k, v in sig.items() if k not in ("OUT", "s_ob", "s_oh")}
        row = {"name": ("single_" if nsplit == 1 else "split_") + name, "dtype": dt}
        try:
            row.update(compile_one(kernel, ksig, const, [a for a in div16 if a in ksig]), ok=True)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000]); failed += 1
        print(json.dumps(row), flush=True)
    for d, nsplit in [(64, 16), (128, 16), (128, 3)]:
        csig = {"PM": "*fp32", "PL": "*fp32", "PACC": "*fp32", "OUT": p, "s_ob": "i32", "s_oh": "i32"}
        const = dict(HQ=32, D=d, D_PAD=d, NSPLIT=nsplit, NS_PAD=triton.next_power_of_2(max(nsplit, 2)))
        row = {"name": f"combine_{d}_{nsplit}", "dtype": dt}
        try:
            row.update(compile_one(km.decode_attention_combine_kernel, csig, const, ["PACC", "OUT", "s_ob", "s_oh"]),
                       ok=True)
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000]); failed += 1
        print(json.dumps(row), flush=True)
sys.exit(1 if failed else 0)
"""


def test_split_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 24, f"rc {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['name']} {r['dtype']}: {r['error']}" for r in failed)
    for r in rows:
        assert not r["local"], f"{r['name']} {r['dtype']} spills to local memory"
        if not r["name"].startswith("combine") and r["dtype"] != "fp32":  # fp32 keeps IEEE products (no TF32 mma)
            assert r["mma"], f"{r['name']} {r['dtype']}: no tensor-core instructions for tl.dot"
