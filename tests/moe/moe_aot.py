"""Ahead-of-time compile the fused MoE kernels for sm_90 in bf16 and fp16, at Mixtral-8x7B and Qwen3-30B-A3B
launch parameters. Needs no GPU; must run WITHOUT ``TRITON_INTERPRET`` (``test_moe_aot.py`` runs it in a fresh
subprocess). Prints one JSON line per variant, as ``tests/kernels/kernel_aot.py`` does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

from kernel_aot import compile_one  # noqa: E402  (raises if TRITON_INTERPRET is set)

from policyinject.kernels import _moe_triton as k  # noqa: E402
from policyinject.kernels.moe import ACT_CODES, gemv_warps, moe_config  # noqa: E402

TY = {"bf16": "*bf16", "fp16": "*fp16"}
SHAPES = {"mixtral": (4096, 14336, 2), "qwen3_30b_a3b": (2048, 768, 8)}


def variants(dt: str) -> Iterator[Tuple[str, Any, Dict, Dict, List[str], int]]:
    p = TY[dt]
    for shape, (hidden, inter, topk) in SHAPES.items():
        experts = 8 if shape == "mixtral" else 128
        dec = moe_config(1, hidden, inter, top_k=topk, num_experts=experts)
        pre = moe_config(512, hidden, inter, top_k=topk, num_experts=experts)
        batch = moe_config(16, hidden, inter, top_k=topk, num_experts=experts)
        for act, bias, bits, zero in (("silu", False, 16, False), ("swiglu_clamped", True, 16, False),
                                      ("silu", False, 8, False), ("silu", False, 4, True)):
            if (bits != 16 and dt != "bf16") or (act != "silu" and shape != "mixtral"):
                continue  # quantized variants in bf16 only, GPT-OSS's activation at one shape
            tag = f"{shape}_{act}" + ("" if bits == 16 else f"_int{bits}")
            dec = moe_config(1, hidden, inter, top_k=topk, num_experts=experts, weight_bits=bits)
            wt = {16: p, 8: "*i8", 4: "*u8"}[bits]
            q = dict(WBITS=bits, HAS_ZERO=zero)
            qsig = {"G": "i32", "stride_se": "i32", "stride_sn": "i32"}
            gemv_scale = dict(SCALE_MODE=0 if bits == 16 else 1 if bits == 8 else 2,
                              NG=dec.block_k // 32 if bits == 4 else 1)
            flags = dict(TOPK=topk, HAS_BIAS=bias, ACT=ACT_CODES[act], GATED=True, UPCAST=False, **q)
            sig = {"X": p, "W13": wt, "S13": "*fp16", "Z13": "*fp16", "B13": p, "IDS": "*i32", "Hb": p, "H": "i32",
                   "I": "i32", "alpha": "fp32", "limit": "fp32", "stride_xt": "i32", "stride_we": "i32",
                   "stride_wn": "i32", "stride_hp": "i32", "stride_be": "i32", "NGROUPS": "i32", **qsig}
            div = ["X", "W13", "B13", "Hb", "H", "I", "stride_xt", "stride_we", "stride_wn", "stride_hp", "stride_be"]
            yield (f"gemv_up_{tag}", k.moe_gemv_up_kernel, sig,
                   dict(flags, BLOCK_N=dec.block_n, BLOCK_K=dec.block_k, EVEN_K=hidden % dec.block_k == 0, **gemv_scale),
                   div, gemv_warps(dec.block_n, dec.block_k, bits))
            sig = {"Hb": p, "W2": wt, "S2": "*fp16", "Z2": "*fp16", "B2": p, "IDS": "*i32", "WTS": "*fp32", "OUT": p,
                   "H": "i32", "I": "i32", "stride_hp": "i32", "stride_we": "i32", "stride_wn": "i32",
                   "stride_ot": "i32", "stride_be": "i32", "NGROUPS": "i32", **qsig}
            div = ["Hb", "W2", "B2", "OUT", "H", "I", "stride_hp", "stride_we", "stride_wn", "stride_ot", "stride_be"]
            yield (f"gemv_down_{tag}", k.moe_gemv_down_kernel, sig,
                   dict(TOPK=topk, HAS_BIAS=bias, BLOCK_N=dec.block_n_down or dec.block_n, BLOCK_K=dec.block_k,
                        EVEN_K=inter % dec.block_k == 0, PER_PAIR=dec.down_per_pair, **q, **gemv_scale), div,
                   gemv_warps(dec.block_n_down or dec.block_n, dec.block_k, bits))
            sig = {"X": p, "W13": wt, "S13": "*fp16", "Z13": "*fp16", "B13": p, "SORTED": "*i32",
                   "BLOCK_EXPERT": "*i32", "Hb": p, "H": "i32", "I": "i32", "alpha": "fp32", "limit": "fp32",
                   "NPAIRS": "i32", "E": "i32", "NGROUPS": "i32", "stride_xt": "i32", "stride_we": "i32", "stride_wn": "i32",
                   "stride_hp": "i32", "stride_be": "i32", **qsig}
            div = ["X", "W13", "B13", "Hb", "H", "I", "stride_xt", "stride_we", "stride_wn", "stride_hp", "stride_be"]
            # int8 per channel: one group per row (a K step inside it); int4 group 32: two groups per K step
            scale = dict(SCALE_MODE=0 if bits == 16 else 1 if bits == 8 else 2, NG=2 if bits == 4 else 1)
            up_sig = sig
            for size, cfg in (("prefill", pre), ("batch16", batch)):
                tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **scale)
                yield (f"gemm_up_{size}_{tag}", k.moe_gemm_up_kernel, up_sig, dict(flags, **tiles), div,
                       cfg.num_warps)
            sig = {"Hb": p, "W2": wt, "S2": "*fp16", "Z2": "*fp16", "B2": p, "SORTED": "*i32",
                   "BLOCK_EXPERT": "*i32", "WTS": "*fp32", "Y": "*fp32", "H": "i32", "I": "i32", "NPAIRS": "i32",
                   "E": "i32", "NGROUPS": "i32", "stride_hp": "i32", "stride_we": "i32", "stride_wn": "i32",
                   "stride_yp": "i32",
                   "stride_be": "i32", **qsig}
            div = ["Hb", "W2", "B2", "Y", "H", "I", "stride_hp", "stride_we", "stride_wn", "stride_yp", "stride_be"]
            for size, cfg in (("prefill", pre), ("batch16", batch)):
                tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **scale)
                yield (f"gemm_down_{size}_{tag}", k.moe_gemm_down_kernel, sig,
                       dict(HAS_BIAS=bias, UPCAST=False, **tiles, **q), div, cfg.num_warps)


def route_variants(dt: str) -> Iterator[Tuple[str, Any, Dict, Dict, List[str], int]]:
    for experts, topk in ((8, 2), (128, 8), (60, 6)):
        block = 1 << (experts - 1).bit_length()
        sig = {"LOGITS": TY[dt], "WEIGHTS": "*fp32", "IDS": "*i32", "E": "i32", "stride_lt": "i32"}
        const = dict(TOPK=topk, SOFTMAX_FIRST=True, NORMALIZE=True, ROUND_BF16=dt == "bf16", ROUND_FP16=dt == "fp16",
                     BLOCK_E=block, TOPK_P2=1 << (topk - 1).bit_length())
        yield f"route_e{experts}_k{topk}", k.moe_route_kernel, sig, const, ["LOGITS", "WEIGHTS", "IDS"], 1


def main() -> int:
    failed = 0
    for dt in ("bf16", "fp16"):
        for name, kernel, sig, const, div16, warps in list(variants(dt)) + list(route_variants(dt)):
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
