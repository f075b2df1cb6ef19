"""Ahead-of-time compile every Triton kernel of the norm/rotary/activation families for an H100 (sm_90).

Needs no GPU. Must run WITHOUT ``TRITON_INTERPRET`` (the interpreter returns functions that cannot be
compiled), so ``test_kernel_aot.py`` runs it in a fresh subprocess::

    python tests/kernels/kernel_aot.py          # prints one JSON line per kernel variant

Each line: name, dtype, ok, error, shared-memory bytes, whether the PTX has 16-byte global loads
(``ld.global.v4``), and whether it spills to local memory.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, Iterator, List, Tuple

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("kernel_aot.py must run without TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from policyinject.kernels import _activations_triton, _norms_triton, _rotary_triton  # noqa: E402
from policyinject.kernels.activations import act_config  # noqa: E402
from policyinject.kernels.norms import norm_config  # noqa: E402
from policyinject.kernels.rotary import rotary_config  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TY = {"bf16": "*bf16", "fp16": "*fp16"}


def norm_variants(dt: str) -> Iterator[Tuple[str, Any, Dict, Dict, List[str], int]]:
    p = TY[dt]
    sig = {"X": p, "R": p, "W": p, "B": p, "Y": p, "S": p, "M": "i32", "N": "i32", "stride_xm": "i32",
           "stride_rm": "i32", "stride_ym": "i32", "stride_sm": "i32", "eps": "fp32", "weight_offset": "fp32"}
    div16 = ["X", "R", "W", "B", "Y", "S", "N", "stride_xm", "stride_rm", "stride_ym", "stride_sm"]
    for name, rms, res, bias, n in [("rms_norm", 1, 0, 0, 4096), ("add_rms_norm", 1, 1, 0, 4096),
                                    ("layer_norm", 0, 0, 1, 4096), ("add_layer_norm", 0, 1, 1, 4096),
                                    ("add_rms_norm_16384", 1, 1, 0, 16384), ("rms_norm_5120", 1, 0, 0, 5120)]:
        cfg = norm_config(4096, n)
        const = dict(IS_RMS=bool(rms), HAS_RESIDUAL=bool(res), HAS_WEIGHT=True, HAS_BIAS=bool(bias),
                     BLOCK_M=cfg.block_m, BLOCK_N=triton.next_power_of_2(n), STREAM=cfg.stream)
        yield name, _norms_triton.norm_fwd_kernel, sig, const, div16, cfg.num_warps


def rotary_variants(dt: str) -> Iterator[Tuple[str, Any, Dict, Dict, List[str], int]]:
    p = TY[dt]
    ints = ["T", "HQ", "HKV", "HALF", "HEAD_DIM"] + [f"s{a}_{b}" for a in ("q", "k", "qo", "ko") for b in "bht"]
    sig = {"Q": p, "K": p, "QO": p, "KO": p, "COS": p, "SIN": p, **{i: "i32" for i in ints + ["sc_b", "sc_t"]}}
    div16 = ["Q", "K", "QO", "KO", "COS", "SIN", "HALF"] + [i for i in ints if i.startswith("s")] + ["sc_b", "sc_t"]
    for name, inter, d, r in [("rotary_half", False, 128, 128), ("rotary_interleaved", True, 128, 128),
                              ("rotary_partial_copy", False, 80, 32)]:
        cfg = rotary_config(4096, 32, 8, r)
        const = dict(INTERLEAVED=inter, COPY_PASS=r < d, BLOCK_H=cfg.block_h,
                     BLOCK_HALF=triton.next_power_of_2(r // 2),
                     BLOCK_PASS=triton.next_power_of_2(d - r) if r < d else 1)
        yield name, _rotary_triton.rotary_kernel, sig, const, div16, cfg.num_warps


def act_variants(dt: str) -> Iterator[Tuple[str, Any, Dict, Dict, List[str], int]]:
    p = TY[dt]
    sig = {"G": p, "U": p, "O": p, "M": "i32", "N": "i32", "stride_gm": "i32", "stride_um": "i32", "stride_om": "i32"}
    div16 = ["G", "U", "O", "N", "stride_gm", "stride_um", "stride_om"]
    cfg = act_config(4096, 14336)
    for name, act in [("swiglu", 0), ("geglu_tanh", 1), ("geglu_exact", 2)]:
        const = dict(ACT=act, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        yield name, _activations_triton.gated_act_kernel, sig, const, div16, cfg.num_warps


def compile_one(kernel: Any, sig: Dict[str, str], const: Dict[str, Any], div16: List[str], num_warps: int) -> Dict:
    sig = dict(sig, **{k: "constexpr" for k in const})
    missing = [a for a in kernel.arg_names if a not in sig]
    if missing:
        raise ValueError(f"signature misses {missing}")
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    cc = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 1})
    ptx = cc.asm["ptx"]
    return {
        "shared": int(cc.metadata.shared),
        "cubin_bytes": len(cc.asm["cubin"]),
        "v4_loads": len(re.findall(r"ld\.global(\.[a-z]+)*\.v4", ptx)),
        "local": bool(re.search(r"\b(ld|st)\.local", ptx)),
    }


def main() -> int:
    only = set(sys.argv[1:])
    failed = 0
    for dt in ("bf16", "fp16"):
        for gen in (norm_variants, rotary_variants, act_variants):
            for name, kernel, sig, const, div16, warps in gen(dt):
                if only and name not in only:
                    continue
                row: Dict[str, Any] = {"name": name, "dtype": dt, "num_warps": warps}
                try:
                    row.update(compile_one(kernel, sig, const, div16, warps), ok=True)
                except Exception as e:  # report every variant, then fail
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                    failed += 1
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
