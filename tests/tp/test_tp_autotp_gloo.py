"""Verified AutoTP plans of architectures without a policy, run on 2 gloo ranks: logits equal the unsharded.

Every plan AutoTP accepts (heuristics or the model's own Hugging Face plan, both verified on one process
before apply) must be right; these are the representative architectures of the coverage table that have no
policy. A failure here is a verifier bug (it accepted a wrong plan).
"""

from __future__ import annotations

import pytest

from tp_workers import run_ranks

pytestmark = pytest.mark.slow

ATOL = 2e-5
#: (model_type, how AutoTP plans it in docs/builtin-policies.md's coverage table)
ARCHS = [
    ("modernbert-decoder", "autotp:heuristic"),  # packed input|gate Wi, corrected to packed_column by the verifier
    ("biogpt", "autotp:heuristic"),
    ("bart", "autotp:heuristic"),
    ("bert-generation", "autotp:heuristic"),
    ("codegen", "autotp:hf_plan"),
    ("gptj", "autotp:hf_plan"),
    ("apertus", "autotp:hf_plan"),
]

_cache: dict = {}


def _results():
    if "r" not in _cache:
        _cache["r"] = run_ranks(2, [("coverage_equal", dict(model_type=a, tp=2)) for a, _ in ARCHS])
    return _cache["r"]


@pytest.mark.parametrize("index", range(len(ARCHS)), ids=[a for a, _ in ARCHS])
def test_verified_autotp_plan_matches_unsharded_logits(index):
    arch, by = ARCHS[index]
    per_rank = [r[index] for r in _results()]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"{arch} rank {rank}:\n{res['error']}"
        assert res["shape_ok"]
        assert res["max_err"] <= ATOL * max(1.0, res["ref_scale"]), (arch, rank, res["max_err"])
        assert by in res["by"], (arch, res["by"])
