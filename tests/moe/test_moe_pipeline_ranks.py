"""MoE through ``init_inference`` on gloo CPU ranks: expert parallelism, experts sliced under tensor
parallelism, and both together, for tiny Mixtral and Qwen2-MoE (shared expert, a dense layer) models.

Each check: fp32 logits equal to the unsharded Hugging Face model's, and greedy tokens equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_workers import run_ranks  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe")
TASKS2 = [("pipeline_equal", dict(family=f, **kw)) for f in FAMILIES for kw in (
    dict(ep=2),                       # EP 2: experts over both ranks, tokens gathered (each rank its own)
    dict(tp=2),                       # experts sliced over the TP group (each expert's gate|up / down split)
    dict(tp=2, ep=2),                 # EP inside the TP group (tokens replicated)
    dict(tp=2, ep=2, ep_group="tp"),  # the same with moe.ep_group given
)]
TASKS4 = [("pipeline_equal", dict(family=f, tp=2, ep=2)) for f in FAMILIES]  # EP across replicas x TP 2


def _check(result: dict, expect_blocks: bool = True) -> None:
    assert "error" not in result, result.get("error")
    assert result["finite"]
    assert result["err"] < 1e-5, result
    assert result["greedy_equal"], result
    assert (result["ep_blocks"] > 0) == expect_blocks, result


@pytest.fixture(scope="module")
def results2() -> list:
    return run_ranks(2, TASKS2)


@pytest.mark.parametrize("index", range(len(TASKS2)), ids=[f"{t[1]}" for t in TASKS2])
def test_two_ranks(results2: list, index: int) -> None:
    for rank in range(2):
        _check(results2[rank][index])
    kw = TASKS2[index][1]
    if kw.get("ep", 1) > 1 and kw.get("tp", 1) == 1:
        assert "tokens=sharded" in results2[0][index]["repr"]
        assert results2[0][index]["engine_decoder"]  # the decode engine generates (no TP): with collectives
    if kw.get("tp", 1) == 2 and kw.get("ep", 1) == 1:
        assert "sliced over 2 ranks" in results2[0][index]["repr"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(TASKS4)), ids=[f"{t[1]}" for t in TASKS4])
def test_four_ranks(index: int, results4: list) -> None:
    for rank in range(4):
        _check(results4[rank][index])
        assert "tokens=sharded" in results4[rank][index]["repr"]
        assert "sliced over 2 ranks" in results4[rank][index]["repr"]


@pytest.fixture(scope="module")
def results4() -> list:
    return run_ranks(4, TASKS4)
